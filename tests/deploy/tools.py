"""Where the deploy checkers live, and what a test does when one is missing.

``scripts/deploy_tools.sh`` (run by the test command) installs hadolint,
kubernetes-validate and checkov into ``.cache/deploy-tools``; kubectl comes from the
machine. Outside CI a missing checker skips its test with the reason; in CI
(``CI=true``) it fails, so that CI never passes without having checked.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".cache" / "deploy-tools" / "bin"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    """Skip with ``reason``, or fail in CI, where every check must run."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: this check must run)")
    pytest.skip(reason)


def tool(name: str) -> str:
    """The path of a checker from .cache/deploy-tools (``kubectl``: from PATH)."""
    if name == "kubectl":
        found = shutil.which("kubectl")
        if found is None:
            unavailable("kubectl is not installed")
        return str(found)
    path = TOOLS / name
    if not path.exists():
        unavailable(f"{path} is missing: run scripts/deploy_tools.sh")
    return str(path)
