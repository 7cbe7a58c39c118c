"""The Triton paged-attention kernels against the torch reference.

Without a GPU these run under Triton's interpreter (tests/conftest.py sets it), where
bfloat16 inputs are cast to float32 inside the kernels; the real bfloat16 path is
compiled by the AOT test at the end and run by ``bench/gpu`` on a GPU.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from pagoda_kernels import attention as reference
from pagoda_kernels import triton_attention as tri
from pagoda_kernels.triton_support import LAUNCHES
from tests.pagoda_kernels.paged_case import PagedCase

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Absolute and relative tolerance per dtype: float32 runs exact float32 products; the
# half types round the probabilities to their own precision before the PV product.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
REPO = Path(__file__).resolve().parents[2]


def on_device(case: PagedCase) -> PagedCase:
    case.key_cache = case.key_cache.to(DEVICE)
    case.value_cache = case.value_cache.to(DEVICE)
    return case


def queries(tokens: int, heads: int, head_dim: int, dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, heads, head_dim, generator=gen).to(dtype).to(DEVICE)


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("kv_heads", "ratio"), [(2, 1), (2, 2), (1, 8)])
def test_decode_matches_reference(dtype, block_size, head_dim, kv_heads, ratio):
    # Contexts ending exactly on a block boundary, just past one, inside one, and a
    # single token; blocks shuffled over the pool.
    ctx_lens = [block_size, block_size + 1, 3 * block_size - 5, 1, 2 * block_size]
    case = on_device(PagedCase(ctx_lens, block_size, kv_heads, head_dim, dtype))
    q = queries(len(ctx_lens), kv_heads * ratio, head_dim, dtype)
    args = (q, case.key_cache, case.value_cache, case.block_tables().to(DEVICE))
    ctx = torch.tensor(ctx_lens, device=DEVICE)
    scale = head_dim**-0.5
    got = tri.paged_attention_decode(*args, ctx, scale)
    assert_close(got, reference.paged_attention_decode(*args, ctx, scale), dtype)


@pytest.mark.parametrize("window", [1, 5, 16, 200])
def test_decode_sliding_window(window):
    ctx_lens = [40, 7, 16, 33, 150]
    case = on_device(PagedCase(ctx_lens, 16, 2, 64, torch.float32, seed=3))
    q = queries(len(ctx_lens), 4, 64, torch.float32, seed=2)
    args = (q, case.key_cache, case.value_cache, case.block_tables().to(DEVICE))
    ctx = torch.tensor(ctx_lens, device=DEVICE)
    got = tri.paged_attention_decode(*args, ctx, 0.125, window)
    assert_close(got, reference.paged_attention_decode(*args, ctx, 0.125, window), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize(("kv_heads", "ratio"), [(1, 1), (2, 8)])
def test_split_k_decode_matches_reference(dtype, window, kv_heads, ratio):
    # Partitions of 128 keys: contexts spanning several, one ending exactly on a
    # partition, and a short one whose later partitions are empty.
    ctx_lens = [500, 256, 3, 129]
    case = on_device(PagedCase(ctx_lens, 16, kv_heads, 64, dtype, seed=7))
    q = queries(len(ctx_lens), kv_heads * ratio, 64, dtype, seed=8)
    args = (q, case.key_cache, case.value_cache, case.block_tables().to(DEVICE))
    ctx = torch.tensor(ctx_lens, device=DEVICE)
    got = tri.decode_split_k(*args, ctx, 0.125, window, partition=128)
    assert_close(got, reference.paged_attention_decode(*args, ctx, 0.125, window), dtype)


def test_decode_takes_split_k_for_few_long_sequences():
    """Few (sequence, KV head) programs over long block tables go through split-K."""
    ctx_lens = [2 * tri.PARTITION + 40, 30]
    case = on_device(PagedCase(ctx_lens, 32, 1, 64, torch.float32, seed=11))
    q = queries(2, 2, 64, torch.float32, seed=12)
    args = (q, case.key_cache, case.value_cache, case.block_tables().to(DEVICE))
    ctx = torch.tensor(ctx_lens, device=DEVICE)
    before = LAUNCHES["paged_attention_decode_split"]
    got = tri.paged_attention_decode(*args, ctx, 0.125)
    assert LAUNCHES["paged_attention_decode_split"] == before + 1
    assert_close(got, reference.paged_attention_decode(*args, ctx, 0.125), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize(("kv_heads", "ratio"), [(2, 1), (2, 2), (1, 8)])
def test_prefill_with_cached_prefix_matches_reference(dtype, window, kv_heads, ratio):
    # (cached prefix, new tokens): none, a prefix ending on a block, one inside a
    # block, a one-token chunk, and a chunk longer than one tile of rows.
    shapes = [(0, 19), (16, 5), (21, 11), (3, 1), (40, 70)]
    ctx_lens = [p + n for p, n in shapes]
    q_lens = [n for _, n in shapes]
    case = on_device(PagedCase(ctx_lens, 16, kv_heads, 64, dtype, seed=5))
    q = queries(sum(q_lens), kv_heads * ratio, 64, dtype, seed=4)
    starts = torch.tensor([0, *itertools.accumulate(q_lens)], device=DEVICE)
    args = (q, case.key_cache, case.value_cache, case.block_tables().to(DEVICE), starts)
    ctx = torch.tensor(ctx_lens, device=DEVICE)
    got = tri.paged_attention_prefill(*args, ctx, 0.125, window)
    want = reference.paged_attention_prefill(*args, ctx, 0.125, window)
    assert_close(got, want, dtype)


@pytest.mark.parametrize(("block_size", "head_dim"), [(32, 128), (16, 96)])
def test_prefill_block_and_head_sizes(block_size, head_dim):
    """Other block sizes, and a head size that is not a power of two (padded in the kernel)."""
    shapes = [(block_size, 2 * block_size), (5, 9)]
    ctx_lens = [p + n for p, n in shapes]
    q_lens = [n for _, n in shapes]
    case = on_device(PagedCase(ctx_lens, block_size, 2, head_dim, torch.float16, seed=9))
    q = queries(sum(q_lens), 6, head_dim, torch.float16, seed=10)
    starts = torch.tensor([0, *itertools.accumulate(q_lens)], device=DEVICE)
    args = (q, case.key_cache, case.value_cache, case.block_tables().to(DEVICE), starts)
    ctx = torch.tensor(ctx_lens, device=DEVICE)
    got = tri.paged_attention_prefill(*args, ctx, head_dim**-0.5)
    assert_close(got, reference.paged_attention_prefill(*args, ctx, head_dim**-0.5), torch.float16)


def test_query_may_be_a_view_of_a_fused_projection():
    """The model hands attention q as a strided slice of its fused QKV output."""
    ctx_lens = [20, 9]
    case = on_device(PagedCase(ctx_lens, 16, 1, 64, torch.float32, seed=13))
    qkv = queries(2, 4 + 2, 64, torch.float32, seed=14)
    q = qkv[:, :4]
    assert not q.is_contiguous()
    args = (case.key_cache, case.value_cache, case.block_tables().to(DEVICE))
    ctx = torch.tensor(ctx_lens, device=DEVICE)
    got = tri.paged_attention_decode(q, *args, ctx, 0.125)
    want = reference.paged_attention_decode(q.contiguous(), *args, ctx, 0.125)
    assert_close(got, want, torch.float32)


def test_empty_batches_launch_nothing():
    cache = torch.zeros(2, 16, 1, 64, device=DEVICE)
    q = torch.zeros(0, 2, 64, device=DEVICE)
    tables = torch.zeros(0, 1, dtype=torch.long, device=DEVICE)
    none = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert tri.paged_attention_decode(q, cache, cache, tables, none, 1.0).shape == (0, 2, 64)
    starts = torch.zeros(1, dtype=torch.long, device=DEVICE)
    assert tri.paged_attention_prefill(q, cache, cache, tables, starts, none, 1.0).shape[0] == 0


def test_mismatched_heads_are_refused():
    cache = torch.zeros(2, 16, 3, 64, device=DEVICE)
    q = torch.zeros(1, 4, 64, device=DEVICE)
    tables = torch.zeros(1, 1, dtype=torch.long, device=DEVICE)
    ctx = torch.ones(1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="do not split"):
        tri.paged_attention_decode(q, cache, cache, tables, ctx, 1.0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the interpreter")
def test_cpu_tensors_need_the_interpreter():
    """Outside interpreter mode a CPU tensor gets a clear error (checked in a fresh process)."""
    code = (
        "import torch; from pagoda_kernels import triton_attention as t\n"
        "c = torch.zeros(1, 16, 1, 64)\n"
        "try:\n"
        "    t.paged_attention_decode(torch.zeros(1, 1, 64), c, c, torch.zeros(1, 1, "
        "dtype=torch.long), torch.ones(1, dtype=torch.long), 1.0)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert "needs CUDA tensors" in out.stdout, out.stderr


def test_every_attention_kernel_compiles_for_gpus():
    """Every kernel, dtype (bfloat16 included) and branch compiles for sm80 and sm90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "pagoda_kernels.aot", "pagoda_kernels.triton_attention"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
