"""The C++ paged-attention kernels against the torch reference, on every variant this CPU runs.

float32 is compared to a float64 attention written out by hand as well, so the
reference itself is checked where it matters.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from pagoda_kernels import attention as reference
from pagoda_kernels import cpu_ops
from tests.pagoda_kernels.paged_case import PagedCase, naive_attention

# The reference rounds scores and probabilities to the half types before its products;
# the kernels keep both in float32.
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def queries(tokens, heads, head_dim, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, heads, head_dim, generator=gen).to(dtype)


def assert_close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


def decode(ops, case, q, window=None, scale=0.125):
    ctx = torch.tensor(case.ctx_lens)
    args = (q, case.key_cache, case.value_cache, case.block_tables(), ctx, scale, window)
    return cpu_ops.paged_attention_decode(ops, *args), reference.paged_attention_decode(*args)


def prefill(ops, case, q, q_lens, window=None, scale=0.125):
    starts = torch.tensor([0, *itertools.accumulate(q_lens)])
    ctx = torch.tensor(case.ctx_lens)
    args = (q, case.key_cache, case.value_cache, case.block_tables(), starts, ctx, scale, window)
    return cpu_ops.paged_attention_prefill(ops, *args), reference.paged_attention_prefill(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize(("kv_heads", "group"), [(4, 1), (2, 2), (2, 4), (1, 8)])
def test_decode_matches_reference(ops, dtype, block_size, head_dim, kv_heads, group):
    # Contexts ending on a block boundary, just past one, inside one, one token, and one
    # spanning many shuffled blocks.
    ctx_lens = [block_size, block_size + 1, 3 * block_size - 5, 1, 300]
    case = PagedCase(ctx_lens, block_size, kv_heads, head_dim, dtype, seed=head_dim)
    got, want = decode(ops, case, queries(len(ctx_lens), kv_heads * group, head_dim, dtype))
    assert_close(got, want, dtype)


@pytest.mark.parametrize("window", [1, 5, 16, 200])
def test_decode_sliding_window(ops, window):
    ctx_lens = [40, 7, 16, 33, 150]
    case = PagedCase(ctx_lens, 16, 2, 64, torch.float32, seed=3)
    got, want = decode(ops, case, queries(len(ctx_lens), 4, 64, torch.float32), window)
    assert_close(got, want, torch.float32)


def test_decode_equals_float64_attention(ops):
    ctx_lens = [37, 5]
    case = PagedCase(ctx_lens, 16, 1, 64, torch.float32, seed=4)
    q = queries(2, 3, 64, torch.float32, seed=5)
    got, _ = decode(ops, case, q, window=9)
    for s in range(2):
        keys, values = case.dense(s)
        want = naive_attention(q[s : s + 1], keys, values, 0.125, 9)[0]
        torch.testing.assert_close(got[s].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize(("kv_heads", "group"), [(2, 1), (2, 2), (1, 8), (2, 4)])
def test_prefill_with_cached_prefix_matches_reference(ops, dtype, window, kv_heads, group):
    # (cached prefix, new tokens): none, a prefix ending on a block, one inside a block,
    # a one-token chunk, and a chunk longer than one tile of rows.
    shapes = [(0, 19), (16, 5), (21, 11), (3, 1), (40, 70)]
    case = PagedCase([p + n for p, n in shapes], 16, kv_heads, 64, dtype, seed=5)
    q_lens = [n for _, n in shapes]
    q = queries(sum(q_lens), kv_heads * group, 64, dtype, seed=4)
    got, want = prefill(ops, case, q, q_lens, window)
    assert_close(got, want, dtype)


@pytest.mark.parametrize(("block_size", "head_dim"), [(32, 128), (16, 80), (128, 64)])
def test_prefill_block_and_head_sizes(ops, block_size, head_dim):
    shapes = [(block_size, 2 * block_size), (5, 9)]
    case = PagedCase([p + n for p, n in shapes], block_size, 2, head_dim, torch.float16, seed=9)
    q_lens = [n for _, n in shapes]
    q = queries(sum(q_lens), 6, head_dim, torch.float16, seed=10)
    got, want = prefill(ops, case, q, q_lens, scale=head_dim**-0.5)
    assert_close(got, want, torch.float16)


def test_multi_query_decode_matches_reference(ops):
    """1 + k queries per sequence over its paged history: how speculation verifies."""
    k = 4
    ctx_lens = [90, 17, 5 + k, 200]
    case = PagedCase(ctx_lens, 16, 2, 64, torch.bfloat16, seed=12)
    q = queries(len(ctx_lens) * (k + 1), 8, 64, torch.bfloat16, seed=13)
    got, want = prefill(ops, case, q, [k + 1] * len(ctx_lens))
    assert_close(got, want, torch.bfloat16)


def test_prefill_equals_float64_attention(ops):
    shapes = [(10, 23), (0, 4)]
    case = PagedCase([p + n for p, n in shapes], 16, 2, 64, torch.float32, seed=6)
    q_lens = [n for _, n in shapes]
    q = queries(sum(q_lens), 4, 64, torch.float32, seed=7)
    got, _ = prefill(ops, case, q, q_lens, window=7)
    start = 0
    for s, n in enumerate(q_lens):
        keys, values = case.dense(s)
        want = naive_attention(q[start : start + n], keys, values, 0.125, 7)
        torch.testing.assert_close(got[start : start + n].double(), want, atol=1e-5, rtol=1e-5)
        start += n


def test_query_may_be_a_view_of_a_fused_projection(ops):
    case = PagedCase([20, 9], 16, 1, 64, torch.bfloat16, seed=13)
    qkv = queries(2, 4 + 2, 64, torch.bfloat16, seed=14)
    q = qkv[:, :4]
    assert not q.is_contiguous()
    got, _ = decode(ops, case, q)
    _, want = decode(ops, case, q.contiguous())
    assert_close(got, want, torch.bfloat16)


def test_queries_in_another_dtype_come_back_in_it(ops):
    case = PagedCase([20], 16, 1, 64, torch.bfloat16, seed=15)
    got, want = decode(ops, case, queries(1, 2, 64, torch.float32))
    assert got.dtype == torch.float32
    assert_close(got, want, torch.bfloat16)


def test_empty_batches(ops):
    cache = torch.zeros(2, 16, 1, 64)
    q = torch.zeros(0, 2, 64)
    tables = torch.zeros(0, 1, dtype=torch.long)
    none = torch.zeros(0, dtype=torch.long)
    assert cpu_ops.paged_attention_decode(ops, q, cache, cache, tables, none, 1.0).shape == (
        0,
        2,
        64,
    )
    starts = torch.zeros(1, dtype=torch.long)
    out = cpu_ops.paged_attention_prefill(ops, q, cache, cache, tables, starts, none, 1.0)
    assert out.shape == (0, 2, 64)


def test_bad_inputs_are_refused(ops):
    cache = torch.zeros(2, 16, 3, 64)
    tables = torch.zeros(1, 1, dtype=torch.long)
    one = torch.ones(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="do not split"):
        cpu_ops.paged_attention_decode(ops, torch.zeros(1, 4, 64), cache, cache, tables, one, 1.0)
    q = torch.zeros(1, 3, 64)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_ops.paged_attention_decode(ops, q, cache, cache, tables + 5, one, 1.0)
    with pytest.raises(RuntimeError, match="does not fit"):
        cpu_ops.paged_attention_decode(ops, q, cache, cache, tables, one * 17, 1.0)
