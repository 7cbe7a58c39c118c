"""The C++ RMS norm, rotary and SwiGLU kernels against their torch references, per variant.

Each kernel rounds where its reference rounds, so float32 agrees to the order of sums
and the half types to a unit in the last place at most.
"""

from __future__ import annotations

import pytest
import torch

from pagoda_kernels import activation, cpu_ops, norm, rotary

TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 8e-3, "atol": 8e-3},
}
DTYPES = list(TOLERANCES)


def randn(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype)


def assert_close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOLERANCES[want.dtype])


def mostly_equal(got, want, share=0.99):
    """In the half types, at least ``share`` of the elements are bit-equal.

    (float32 keeps the different order of sums in every last bit.)
    """
    if want.dtype != torch.float32:
        assert (got == want).float().mean().item() >= share


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [576, 512, 100, 64])
def test_rms_norm(ops, dtype, width):
    x, weight = randn(37, width, dtype=dtype), randn(width, dtype=dtype, seed=1)
    got, want = cpu_ops.rms_norm(ops, x, weight, 1e-6), norm.rms_norm(x, weight, 1e-6)
    assert_close(got, want)
    mostly_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_residual(ops, dtype):
    x, residual = randn(19, 576, dtype=dtype), randn(19, 576, dtype=dtype, seed=2)
    weight = randn(576, dtype=dtype, seed=1)
    before = residual.clone()
    got, got_sum = cpu_ops.rms_norm(ops, x, weight, 1e-5, residual)
    want, want_sum = norm.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(got_sum, want_sum)
    assert_close(got, want)
    assert torch.equal(residual, before)


def test_rms_norm_over_heads_of_a_fused_projection(ops):
    """Qwen3's q/k norm: one row per head, in a strided view."""
    qkv = randn(5, 12, 64, dtype=torch.bfloat16)
    q = qkv[:, :8]
    weight = randn(64, dtype=torch.bfloat16, seed=3)
    assert_close(cpu_ops.rms_norm(ops, q, weight, 1e-6), norm.rms_norm(q, weight, 1e-6))


def test_rms_norm_with_a_float32_weight_follows_the_reference(ops):
    x, weight = randn(3, 64, dtype=torch.bfloat16), randn(64, seed=1)
    got, want = cpu_ops.rms_norm(ops, x, weight, 1e-6), norm.rms_norm(x, weight, 1e-6)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def qkv_views(tokens, heads, kv_heads, head_dim, dtype):
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = randn(tokens, q_size + 2 * kv_size, dtype=dtype, seed=tokens + head_dim)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return q.reshape(tokens, heads, head_dim), k.reshape(tokens, kv_heads, head_dim)


def rope_table(head_dim, positions=512):
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(positions).float(), inv)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 80), (8, 2, 128)])
def test_rotary_in_place(ops, dtype, is_neox, heads, kv_heads, head_dim):
    q, k = qkv_views(23, heads, kv_heads, head_dim, dtype)
    positions = torch.randperm(512, generator=torch.Generator().manual_seed(0))[:23]
    table = rope_table(head_dim)
    want_q, want_k = rotary.rotary_embedding(positions, q, k, table, is_neox)
    got_q, got_k = cpu_ops.rotary_embedding(ops, positions, q, k, table, is_neox)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()
    assert_close(got_q, want_q)
    assert_close(got_k, want_k)
    mostly_equal(got_q, want_q)


def test_rotary_position_outside_the_table_is_refused(ops):
    q, k = qkv_views(2, 2, 1, 64, torch.float32)
    with pytest.raises(RuntimeError, match="outside the table"):
        cpu_ops.rotary_embedding(ops, torch.tensor([0, 512]), q, k, rope_table(64), True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1536, 1408, 100])
def test_silu_and_mul(ops, dtype, width):
    x = randn(29, 2 * width, dtype=dtype) * 3
    got, want = cpu_ops.silu_and_mul(ops, x), activation.silu_and_mul(x)
    assert_close(got, want)
    mostly_equal(got, want)


def test_silu_and_mul_keeps_leading_dims(ops):
    x = randn(2, 3, 128, dtype=torch.bfloat16)
    assert_close(cpu_ops.silu_and_mul(ops, x), activation.silu_and_mul(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [32000, 49152, 1000, 7])
def test_argmax_is_torch_argmax(ops, dtype, width):
    x = randn(9, width, dtype=dtype)
    x[1, 5] = x[1, width - 1] = x[1].max() + 1  # a tie: the first one wins
    x[2] = float("-inf")
    x[3, width // 2] = float("nan")  # NaN counts as the maximum
    x[4] = 0.0
    got = cpu_ops.argmax(ops, x)
    assert got.dtype == torch.long and torch.equal(got, x.argmax(-1))


def test_argmax_of_a_slice_of_wider_logits(ops):
    x = randn(5, 1030, dtype=torch.bfloat16)[:, :1000]
    assert torch.equal(cpu_ops.argmax(ops, x), x.argmax(-1))
