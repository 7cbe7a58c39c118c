"""Prefix-cache block hashes, byte-for-byte the same in every process.

A full block is named by sha256(parent ‖ tokens ‖ extra): ``parent`` is the
previous block's 32-byte hash (32 zero bytes for a sequence's first block),
``tokens`` its ``block_size`` token ids as little-endian uint32, and ``extra``
the request's extra keys (see :func:`extra_keys`). Chaining through the parent
makes a hash name the whole prefix, so one dictionary lookup per block finds the
longest cached prefix. Python's ``hash()`` is salted per process, which is why
this is sha256: external routers rebuild the same index from the events.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Sequence

ROOT_PARENT = bytes(32)

_SWAP = sys.byteorder != "little"
assert array("I").itemsize == 4, "array('I') must hold uint32"


def extra_keys(lora_id: str = "", cache_salt: str = "") -> bytes:
    """The extra keys of a request: each as a uint32 length then UTF-8; empty when none.

    Blocks of requests with another LoRA adapter or another cache salt hash
    differently, so they never share KV.
    """
    if not lora_id and not cache_salt:
        return b""
    out = bytearray()
    for key in (lora_id, cache_salt):
        raw = key.encode()
        out += struct.pack("<I", len(raw)) + raw
    return bytes(out)


def hash_block(parent: bytes, token_ids: Sequence[int], extra: bytes = b"") -> bytes:
    """The hash of one full block whose previous block hashes to ``parent``."""
    tokens = array("I", token_ids)
    if _SWAP:
        tokens.byteswap()
    h = hashlib.sha256(parent)
    h.update(tokens.tobytes())
    if extra:
        h.update(extra)
    return h.digest()


def extend_hashes(
    hashes: list[bytes], token_ids: Sequence[int], block_size: int, extra: bytes = b""
) -> None:
    """Append to ``hashes`` the hash of every full block of ``token_ids`` not hashed yet."""
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[i - 1] if i else ROOT_PARENT
        hashes.append(hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], extra))
