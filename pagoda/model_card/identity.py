"""The model identity: one hash of config, weight index and tokenizer.

It is computed here, by one pure function, so that the card (made on one machine) and
the worker (loading the weights on another) agree on the string. The scheduler refuses
a worker whose identity is not its card's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pagoda.model_card.errors import ModelCardError, read_json
from pagoda.model_card.safetensors_header import read_safetensors_header

# Mixed into every identity, so a change to what the hash covers changes every identity.
IDENTITY_VERSION = b"pagoda-model-identity-v1"
# Bytes of each tensor's data that enter the weight index: cheap to read (one small read
# per tensor), yet two fine-tunes of one base model, which share config, shapes and
# tokenizer, get different identities.
WEIGHT_SAMPLE_BYTES = 32
# Keys of config.json that say how the file was written, not what the model is.
_PROVENANCE_KEYS = ("transformers_version",)


def canonical_json(value: Any, *, allow_nan: bool = False) -> bytes:
    """One byte string per JSON value: sorted keys, no spaces, UTF-8, no NaN (unless
    ``allow_nan``: then NaN and infinities take JSON's usual spellings)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan
    ).encode("utf-8")


def model_identity(
    config: dict[str, Any], weight_index: Iterable[Sequence[Any]], tokenizer: bytes
) -> str:
    """The model identity: a sha256, in hex, over

    ``IDENTITY_VERSION "\\n" canonical(config) "\\n" canonical(sorted weight index) "\\n"
    tokenizer``.

    ``config`` is the Hugging Face config without provenance keys (``transformers_version``
    and those starting with ``_``); each weight-index entry is a list such as ``[tensor
    name, shape, dtype, hex of the first data bytes]``; ``tokenizer`` is the bytes of
    ``tokenizer.json`` (empty if the folder has none) or, for a GGUF file, the canonical
    JSON of its ``tokenizer.*`` metadata. Canonical JSON values end unambiguously, so
    the separators cannot be forged by the parts.
    """
    clean = {k: v for k, v in config.items() if k not in _PROVENANCE_KEYS and not k.startswith("_")}
    entries = sorted((list(e) for e in weight_index), key=lambda e: (str(e[0]), canonical_json(e)))
    digest = hashlib.sha256()
    for part in (IDENTITY_VERSION, canonical_json(clean), canonical_json(entries)):
        digest.update(part)
        digest.update(b"\n")
    digest.update(tokenizer)
    return digest.hexdigest()


def short_identity(identity: str) -> str:
    """The first 12 hex digits: enough to tell cached cards apart in a folder name."""
    return identity[:12]


def hf_folder_identity(folder: str | Path, *, config: dict[str, Any] | None = None) -> str:
    """The identity of a Hugging Face folder (what its worker and its card both compute)."""
    folder = Path(folder)
    if config is None:
        config = read_json(folder / "config.json")
    tokenizer = folder / "tokenizer.json"
    tokenizer_bytes = tokenizer.read_bytes() if tokenizer.is_file() else b""
    return model_identity(config, hf_weight_index(folder), tokenizer_bytes)


def hf_weight_index(folder: str | Path) -> list[list[Any]]:
    """The weight index of a Hugging Face folder.

    Safetensors are preferred, as transformers prefers them: the files named by
    ``model.safetensors.index.json``, else every ``*.safetensors`` in the folder. For
    ``pytorch_model*.bin`` (pickles, unreadable without torch) each entry is
    ``[file name, [size in bytes], "bin", ""]``.
    """
    folder = Path(folder)
    files = _weight_files(folder, "model.safetensors.index.json", "*.safetensors")
    if files:
        return [entry for file in files for entry in safetensors_index(file)]
    files = _weight_files(folder, "pytorch_model.bin.index.json", "pytorch_model*.bin")
    if files:
        return [[f.name, [f.stat().st_size], "bin", ""] for f in files]
    raise ModelCardError(
        f"{str(folder)!r} has a config.json but no weights (*.safetensors or pytorch_model*.bin)"
    )


def safetensors_index(path: str | Path) -> list[list[Any]]:
    """``[name, shape, dtype, sample hex]`` of every tensor in a safetensors file.

    Reads only the JSON header and ``WEIGHT_SAMPLE_BYTES`` per tensor (no torch).
    """
    path = Path(path)
    with path.open("rb") as f:
        tensors, base = read_safetensors_header(f, path)
        entries = []
        for name, info in tensors.items():
            begin, end = info["data_offsets"]
            f.seek(base + begin)
            sample = f.read(min(WEIGHT_SAMPLE_BYTES, end - begin)).hex()
            entries.append([name, list(info["shape"]), info["dtype"], sample])
    return entries


def _weight_files(folder: Path, index_name: str, pattern: str) -> list[Path]:
    index = folder / index_name
    if index.is_file():
        weight_map = read_json(index).get("weight_map") or {}
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelCardError(f"{index} names missing weight files: {', '.join(missing)}")
        return files
    return sorted(p for p in folder.glob(pattern) if p.is_file())
