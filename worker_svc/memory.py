"""How the worker asks the C allocator to treat the large tensors of every step.

glibc serves each allocation above its mmap threshold with a fresh mmap and returns
it to the kernel on free, so every step's gathered keys and values (megabytes, made
and dropped in every layer) come back as fresh pages that fault in on first touch.
On a 2-core CPU that made one layer's KV gather take 6 ms instead of 0.6 ms.
Raising the mmap threshold to its maximum and the trim threshold keeps freed memory
in the process for the next step. It changes nothing where the allocator is not
glibc's.

The cost of keeping it is that a worker which has gone idle still holds the peak of
its last load: a busy wave left 140 to 190 MB free in the heap. So the runner gives it
back once, when it holds no sequence any more (``release_freed_memory``); the next
load faults its pages in again, once.

oneDNN keeps every primitive it has built (one per GEMM shape, and decode batches come
in every size) up to 1,024 of them. Under varied loads that cache alone grew the
worker by ~30 MB a wave; capped at 64 primitives (``cap_onednn_cache``) five waves of
1,000 requests end 1.1% above the fourth instead of 2.5%, at no throughput cost we
could measure (docs/benchmarks.md). An operator's own setting wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit systems
_TRIM_THRESHOLD = 1 << 30
_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 << 20
ONEDNN_CACHE_CAPACITY = "64"


@cache
def _libc_function(name: str):
    """glibc's ``name``, or None where the C library is not found or lacks it.

    Looked up once: ``find_library`` runs ``ldconfig``, and the runner asks for
    ``malloc_trim`` each time it goes idle.
    """
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    try:
        return getattr(ctypes.CDLL(path), name)
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Tell glibc to reuse freed memory; False where that is not possible."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    return mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok


def cap_onednn_cache() -> str:
    """Cap oneDNN's primitive cache unless the environment sets it; returns the capacity.

    oneDNN reads the variable when it builds its first primitive, so this runs before
    the model loads.
    """
    return os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask the kernel to back ``tensor``'s memory with 2 MiB pages; call before first touch.

    Paged attention reads a few hundred bytes from each of thousands of scattered blocks
    per layer: with 4 KiB pages nearly every block costs a TLB miss. Linux grants huge
    pages to a range marked so when transparent huge pages are in ``madvise`` mode (the
    common default) or ``always``; elsewhere the advice changes nothing. False when it
    could not be given (no glibc, not a CPU tensor, or less than one huge page).
    """
    madvise = _libc_function("madvise")
    if madvise is None or tensor.device.type != "cpu":
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    start = -(-begin // _HUGE_PAGE) * _HUGE_PAGE
    stop = end // _HUGE_PAGE * _HUGE_PAGE
    if stop <= start:
        return False
    return madvise(start, stop - start, _MADV_HUGEPAGE) == 0


@cache
def _tcmalloc_release():
    """tcmalloc's C call that returns its free pages, when the worker preloaded it."""
    return getattr(ctypes.CDLL(None), "MallocExtension_ReleaseFreeMemory", None)


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the kernel; False where that is not possible.

    Under tcmalloc (worker_svc/runtime.py) most memory is tcmalloc's, which keeps freed
    pages in its own caches; glibc's heap still serves what was allocated before the
    preload took over, so both are asked.
    """
    released = False
    tcmalloc = _tcmalloc_release()
    if tcmalloc is not None:
        tcmalloc()
        released = True
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim is None:
        return released
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim(0)
    return True
