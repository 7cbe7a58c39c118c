"""The Triton RMS norm, rotary and SwiGLU kernels against their torch references.

Without a GPU they run under Triton's interpreter on CPU tensors (see conftest), which
is slow per program: the shapes are the default model's (hidden 576, 9 query and 3
key heads of 64) and a few larger ones, each launched as one or two programs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from pagoda_kernels import activation, norm, rotary
from pagoda_kernels import triton_pointwise as tp
from pagoda_kernels.triton_support import LAUNCHES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parents[2]

# Each kernel rounds where its reference does, so it differs only by the order of sums
# (and the GPU's exp and rsqrt): a unit or two in the last place of each dtype.
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2},
}
DTYPES = list(TOLERANCES)
EPS = 1e-6


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def qkv_views(
    tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as the attention layer makes them: views into a fused qkv row."""
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = randn(tokens, q_size + 2 * kv_size, dtype=dtype, seed=tokens + head_dim)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return q.reshape(tokens, heads, head_dim), k.reshape(tokens, kv_heads, head_dim)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **TOLERANCES[expected.dtype])


def assert_untouched(*pairs: tuple[torch.Tensor, torch.Tensor]) -> None:
    for tensor, copy in pairs:
        assert torch.equal(tensor, copy)


# --- RMS norm -------------------------------------------------------------------------


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [576, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference(dtype, hidden, with_residual):
    tokens = 7 if hidden == 4096 else 37
    x = randn(tokens, hidden, dtype=dtype) * 3
    weight = randn(hidden, dtype=dtype, seed=1)
    residual = randn(tokens, hidden, dtype=dtype, seed=2) if with_residual else None
    copies = [(t, t.clone()) for t in (x, weight, residual) if t is not None]
    before = LAUNCHES[tp.RMS_NORM]
    got = tp.rms_norm(x, weight, EPS, residual)
    want = norm.rms_norm(x, weight, EPS, residual)
    assert LAUNCHES[tp.RMS_NORM] == before + 1
    if with_residual:
        assert torch.equal(got[1], want[1])  # the sum is rounded once, like the reference
        got, want = got[0], want[0]
    assert_close(got, want)
    assert_untouched(*copies)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_on_qkv_views(dtype, head_dim):
    q, k = qkv_views(11, 9, 3, head_dim, dtype)
    weight = randn(head_dim, dtype=dtype, seed=3)
    q_copy, k_copy = q.clone(), k.clone()
    for x in (q, k):
        assert not x.is_contiguous()
        assert_close(tp.rms_norm(x, weight, EPS), norm.rms_norm(x, weight, EPS))
    assert_untouched((q, q_copy), (k, k_copy))


def test_rms_norm_float32_weight_promotes_like_the_reference():
    x = randn(5, 576, dtype=torch.bfloat16)
    weight = randn(576, seed=1)
    residual = randn(5, 576, dtype=torch.bfloat16, seed=2)
    got, got_residual = tp.rms_norm(x, weight, EPS, residual)
    want, want_residual = norm.rms_norm(x, weight, EPS, residual)
    assert got.dtype == torch.float32
    assert_close(got, want)
    assert torch.equal(got_residual, want_residual)


# --- rotary embeddings ----------------------------------------------------------------


def cos_sin_cache(head_dim: int, max_position: int = 4096) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_reference_on_qkv_views(dtype, head_dim, is_neox):
    tokens = 13
    q, k = qkv_views(tokens, 9, 3, head_dim, dtype)
    gen = torch.Generator().manual_seed(head_dim)
    positions = torch.randint(0, 4096, (tokens,), generator=gen).to(DEVICE)
    cache = cos_sin_cache(head_dim)
    copies = [(t, t.clone()) for t in (positions, q, k, cache)]
    before = LAUNCHES[tp.ROTARY]
    got_q, got_k = tp.rotary_embedding(positions, q, k, cache, is_neox)
    want_q, want_k = rotary.rotary_embedding(positions, q, k, cache, is_neox)
    assert LAUNCHES[tp.ROTARY] == before + 1
    assert_close(got_q, want_q)
    assert_close(got_k, want_k)
    assert_untouched(*copies)


def test_rotary_contiguous_heads_and_more_query_heads():
    q = randn(6, 32, 128, dtype=torch.float16)
    k = randn(6, 8, 128, dtype=torch.float16, seed=1)
    positions = torch.tensor([0, 1, 2, 3, 4095, 7], device=DEVICE)
    cache = cos_sin_cache(128)
    got_q, got_k = tp.rotary_embedding(positions, q, k, cache, True)
    want_q, want_k = rotary.rotary_embedding(positions, q, k, cache, True)
    assert_close(got_q, want_q)
    assert_close(got_k, want_k)


# --- SwiGLU ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(37, 2 * 1536), (2, 5, 2 * 1000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_reference(dtype, shape):
    x = randn(*shape, dtype=dtype) * 4
    copy = x.clone()
    before = LAUNCHES[tp.SILU_AND_MUL]
    got = tp.silu_and_mul(x)
    assert LAUNCHES[tp.SILU_AND_MUL] == before + 1
    assert_close(got, activation.silu_and_mul(x))
    assert_untouched((x, copy))


def test_silu_and_mul_on_a_strided_view():
    wide = randn(9, 3 * 512, dtype=torch.bfloat16)
    x = wide[:, : 2 * 512]
    assert_close(tp.silu_and_mul(x), activation.silu_and_mul(x))


# --- many programs, partial blocks ----------------------------------------------------


def test_small_tiles_split_the_work_over_many_programs(monkeypatch):
    """With a tiny tile every launch takes several programs with partial blocks."""
    monkeypatch.setattr(tp, "_INTERPRET_TILE", 256)
    dtype = torch.bfloat16
    x = randn(5, 576, dtype=dtype)
    weight = randn(576, dtype=dtype, seed=1)
    residual = randn(5, 576, dtype=dtype, seed=2)
    got, got_residual = tp.rms_norm(x, weight, EPS, residual)
    want, want_residual = norm.rms_norm(x, weight, EPS, residual)
    assert_close(got, want)
    assert torch.equal(got_residual, want_residual)
    q, k = qkv_views(3, 9, 3, 64, dtype)
    positions = torch.tensor([5, 0, 77], device=DEVICE)
    cache = cos_sin_cache(64, 128)
    for got_t, want_t in zip(
        tp.rotary_embedding(positions, q, k, cache, False),
        rotary.rotary_embedding(positions, q, k, cache, False),
        strict=True,
    ):
        assert_close(got_t, want_t)
    x = randn(3, 2 * 600, dtype=dtype)
    assert_close(tp.silu_and_mul(x), activation.silu_and_mul(x))


def test_empty_inputs_launch_nothing():
    before = sum(LAUNCHES.values())
    x = randn(0, 576)
    assert tp.rms_norm(x, randn(576), EPS).shape == (0, 576)
    assert tp.silu_and_mul(randn(0, 64)).shape == (0, 32)
    q, k = randn(0, 4, 64), randn(0, 2, 64)
    got_q, got_k = tp.rotary_embedding(randn(0).long(), q, k, cos_sin_cache(64, 8), True)
    assert got_q.shape == q.shape and got_k.shape == k.shape
    assert sum(LAUNCHES.values()) == before


# --- ahead-of-time compile ------------------------------------------------------------


def test_every_variant_compiles_for_gpus():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "pagoda_kernels.aot", "pagoda_kernels.triton_pointwise"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
