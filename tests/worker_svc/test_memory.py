"""The worker keeps freed heap while busy and gives it back when it goes idle."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys

import pytest

from worker_svc.memory import advise_huge_pages, keep_freed_memory, release_freed_memory

CHUNK = 64 << 10  # below glibc's mmap threshold: served from the heap
TOTAL = 256 << 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_freed_heap_stays_until_it_is_released():
    assert keep_freed_memory(), "glibc's mallopt should be found on Linux"
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    chunks = [libc.malloc(CHUNK) for _ in range(TOTAL // CHUNK)]
    assert all(chunks)
    for chunk in chunks:
        ctypes.memset(chunk, 1, CHUNK)
    for chunk in reversed(chunks):
        libc.free(chunk)
    kept = rss_bytes()
    assert release_freed_memory()
    released = rss_bytes()
    assert kept - released > TOTAL // 2, (kept, released)


@pytest.mark.parametrize(("given", "want"), [(None, "64"), ("16", "16")])
def test_onednn_cache_is_capped_unless_the_operator_says_otherwise(given, want):
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if given is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = given
    code = (
        "import os; from worker_svc.memory import cap_onednn_cache\n"
        "print(cap_onednn_cache(), os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [want, want]


def huge_pages_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unknown"


def anon_huge_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


@pytest.mark.skipif(huge_pages_mode() not in ("madvise", "always"), reason="no THP here")
def test_the_kv_cache_gets_huge_pages():
    import torch

    before = anon_huge_kib()
    cache = torch.empty(64 << 20, dtype=torch.uint8)
    assert advise_huge_pages(cache)
    cache.zero_()
    assert anon_huge_kib() - before >= 32 << 10  # at least half of it, in KiB


def test_huge_pages_are_not_asked_for_a_range_smaller_than_one():
    import torch

    assert not advise_huge_pages(torch.empty(4096, dtype=torch.uint8))
