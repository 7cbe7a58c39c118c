"""The one error of the card package, and the JSON reader that raises it.

Every part of a card is a JSON file; an error names the file, so that the user knows
which one to fix or which command to run again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ModelCardError(ValueError):
    """A path that cannot serve as a model card, with what to do about it."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, with the file named in any error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelCardError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelCardError(f"{path} does not hold a JSON object")
    return data
