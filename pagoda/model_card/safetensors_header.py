"""The JSON header of a safetensors file, read with the standard library.

A safetensors file starts with the size of its header (8 bytes, little endian), then
the header: a JSON object that gives each tensor's dtype, shape and byte range in the
data that follows. Reading it needs no torch, so the scheduler can hash the weights.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

from pagoda.model_card.errors import ModelCardError

# A safetensors header larger than this is not a safetensors file.
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def read_safetensors_header(f: BinaryIO, path: Path) -> tuple[dict[str, Any], int]:
    """(tensors, data start) of the safetensors file open as ``f`` at its first byte.

    ``tensors`` maps each tensor name to its ``dtype``, ``shape`` and ``data_offsets``
    (without the ``__metadata__`` entry); the offsets count from ``data start``.
    ``path`` only names the file in errors.
    """
    head = f.read(8)
    if len(head) != 8:
        raise ModelCardError(f"{path} is not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", head)
    if size > _MAX_SAFETENSORS_HEADER:
        raise ModelCardError(f"{path} is not a safetensors file (header of {size} bytes)")
    try:
        header = json.loads(f.read(size))
    except ValueError as exc:
        raise ModelCardError(f"{path} is not a safetensors file: {exc}") from None
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    return tensors, 8 + size
