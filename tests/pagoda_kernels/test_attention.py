"""Paged attention and the cache write against a naive float64 implementation."""

from __future__ import annotations

import itertools

import pytest
import torch

from pagoda_kernels.attention import paged_attention_decode, paged_attention_prefill
from pagoda_kernels.cache import reshape_and_cache
from tests.pagoda_kernels.paged_case import PagedCase, naive_attention

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("kv_heads", "ratio"), [(2, 1), (2, 2), (1, 8), (6, 1), (6, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_naive(block_size, head_dim, kv_heads, ratio, dtype):
    heads = kv_heads * ratio
    # Contexts that end on a block boundary, just past one, and inside a block.
    ctx_lens = [block_size, block_size + 1, 3 * block_size - 5, 1, 2 * block_size]
    case = PagedCase(ctx_lens, block_size, kv_heads, head_dim, dtype)
    q = torch.randn(len(ctx_lens), heads, head_dim, generator=torch.Generator().manual_seed(1))
    q = q.to(dtype)
    scale = head_dim**-0.5
    out = paged_attention_decode(
        q, case.key_cache, case.value_cache, case.block_tables(), torch.tensor(ctx_lens), scale
    )
    assert out.dtype == dtype and out.shape == q.shape
    for s in range(len(ctx_lens)):
        k, v = case.dense(s)
        want = naive_attention(q[s : s + 1], k, v, scale, None)[0]
        torch.testing.assert_close(out[s].double(), want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("window", [1, 5, 16])
def test_decode_sliding_window(window):
    ctx_lens = [40, 7, 16, 33]
    case = PagedCase(ctx_lens, 16, 2, 64, torch.float32, seed=3)
    q = torch.randn(4, 4, 64, generator=torch.Generator().manual_seed(2))
    out = paged_attention_decode(
        q, case.key_cache, case.value_cache, case.block_tables(), torch.tensor(ctx_lens),
        0.125, sliding_window=window,
    )  # fmt: skip
    for s in range(4):
        k, v = case.dense(s)
        want = naive_attention(q[s : s + 1], k, v, 0.125, window)[0]
        torch.testing.assert_close(out[s].double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize(("kv_heads", "ratio"), [(2, 1), (2, 2), (1, 8), (6, 2)])
def test_prefill_with_cached_prefix_matches_naive(window, kv_heads, ratio):
    # (cached prefix, new tokens): no prefix, a prefix ending on a block, one inside a block.
    shapes = [(0, 19), (16, 5), (21, 11), (3, 1), (32, 16)]
    ctx_lens = [p + n for p, n in shapes]
    heads = kv_heads * ratio
    case = PagedCase(ctx_lens, 16, kv_heads, 64, torch.float32, seed=5)
    q_lens = [n for _, n in shapes]
    q = torch.randn(sum(q_lens), heads, 64, generator=torch.Generator().manual_seed(4))
    starts = torch.tensor([0, *itertools.accumulate(q_lens)])
    out = paged_attention_prefill(
        q, case.key_cache, case.value_cache, case.block_tables(), starts, torch.tensor(ctx_lens),
        0.125, sliding_window=window,
    )  # fmt: skip
    for s in range(len(shapes)):
        k, v = case.dense(s)
        rows = slice(int(starts[s]), int(starts[s + 1]))
        want = naive_attention(q[rows], k, v, 0.125, window)
        torch.testing.assert_close(out[rows].double(), want, atol=2e-5, rtol=2e-5)


def test_reshape_and_cache_writes_slots_and_skips_padding():
    key_cache = torch.zeros(4, 8, 2, 16)
    value_cache = torch.zeros(4, 8, 2, 16)
    key = torch.randn(5, 2, 16)
    value = torch.randn(5, 2, 16)
    slots = torch.tensor([3, 8 * 2 + 7, -1, 0, 8 * 3 + 1])
    reshape_and_cache(key, value, key_cache, value_cache, slots)
    flat_k, flat_v = key_cache.flatten(0, 1), value_cache.flatten(0, 1)
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], key[i]) and torch.equal(flat_v[slot], value[i])
    assert int((flat_k.abs().sum(dim=(1, 2)) > 0).sum()) == 4, "the padding token wrote nothing"
