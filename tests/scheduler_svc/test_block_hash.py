import hashlib
import struct
import subprocess
import sys

from scheduler_svc.block_hash import ROOT_PARENT, extend_hashes, extra_keys, hash_block


def test_hash_is_sha256_over_parent_tokens_le_uint32_and_extra():
    tokens = [1, 2, 70_000, 2**32 - 1]
    want = hashlib.sha256(bytes(32) + struct.pack("<4I", *tokens)).digest()
    assert hash_block(ROOT_PARENT, tokens) == want
    extra = extra_keys("lora-a", "salt")
    want = hashlib.sha256(
        want
        + struct.pack("<2I", 5, 6)
        + struct.pack("<I", 6)
        + b"lora-a"
        + struct.pack("<I", 4)
        + b"salt"
    ).digest()
    assert hash_block(hash_block(ROOT_PARENT, tokens), [5, 6], extra) == want


def test_extra_keys_separate_requests_and_are_unambiguous():
    assert extra_keys() == b""
    assert extra_keys("ab", "") != extra_keys("a", "b")
    assert extra_keys("", "salt") != extra_keys("salt", "")
    tokens = list(range(16))
    assert hash_block(ROOT_PARENT, tokens, extra_keys(cache_salt="x")) != hash_block(
        ROOT_PARENT, tokens
    )


def test_chain_names_the_whole_prefix():
    a, b = [], []
    extend_hashes(a, [1, 2, 3, 4, 5, 6, 7, 8, 9], block_size=4)
    extend_hashes(b, [9, 2, 3, 4, 5, 6, 7, 8], block_size=4)
    assert len(a) == 2 and len(b) == 2  # only full blocks are hashed
    assert a[1] != b[1]  # same second block, different first block
    c = list(a[:1])
    extend_hashes(c, [1, 2, 3, 4, 5, 6, 7, 8, 9], block_size=4)
    assert c == a  # extending an existing chain gives the same hashes


SCRIPT = """
from scheduler_svc.block_hash import extend_hashes, extra_keys
h = []
extend_hashes(h, list(range(1000, 1100)), 16, extra_keys("lora", "salt"))
print(",".join(x.hex() for x in h))
"""


def test_hashes_are_equal_across_processes():
    runs = [
        subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    assert runs[0].stdout == runs[1].stdout
    h: list[bytes] = []
    extend_hashes(h, list(range(1000, 1100)), 16, extra_keys("lora", "salt"))
    assert runs[0].stdout.strip() == ",".join(x.hex() for x in h)
