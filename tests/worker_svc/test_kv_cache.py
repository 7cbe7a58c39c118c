"""The KV cache is in memory from the start: its pages are touched when it is allocated.

A cache allocated untouched (``torch.empty``) would fault its pages in as blocks are
first used, so the worker's memory would climb through its first busy minutes and look
like a leak; vLLM reserves its cache up front for the same reason.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys

import pytest
import torch

from tests.worker_svc.hf_oracle import build_model
from worker_svc.model_runner import ModelRunner

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore(2)")


def resident_fraction(tensor: torch.Tensor) -> float:
    """The fraction of the tensor's pages in RAM, by mincore(2)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page * page
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    pages = -(-(end - start) // page)
    vec = (ctypes.c_ubyte * pages)()
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(v & 1 for v in vec) / pages


def test_every_page_of_the_kv_cache_is_resident_after_start_up(tmp_path):
    path = build_model("llama", tmp_path)
    # 64 MiB: far above glibc's mmap threshold, so the tensor gets pages of its own
    # that nothing else touched.
    runner = ModelRunner(path, dtype="float32", kv_cache_memory=64 << 20, show_progress=False)
    assert runner.kv_cache.numel() * runner.kv_cache.element_size() > 32 << 20
    assert resident_fraction(runner.kv_cache) == 1.0


def test_resident_fraction_sees_untouched_pages():
    """The check itself: a fresh anonymous mapping is not resident until written. (A
    ``torch.empty`` tensor may reuse pages the allocator already touched.)"""
    region = mmap.mmap(-1, 64 << 20)
    untouched = torch.frombuffer(region, dtype=torch.uint8)
    assert resident_fraction(untouched) < 0.5
    untouched.fill_(1)
    assert resident_fraction(untouched) == 1.0
