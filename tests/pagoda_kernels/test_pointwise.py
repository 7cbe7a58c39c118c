"""RMS norm, rotary embeddings and SwiGLU against transformers' own implementations."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from pagoda_kernels import cpu_build, dispatch
from pagoda_kernels.activation import silu_and_mul
from pagoda_kernels.dispatch import TORCH, available_backends, get_ops
from pagoda_kernels.norm import rms_norm
from pagoda_kernels.rotary import rotary_embedding
from worker_svc.layers.rotary import inverse_frequencies

GEN = torch.Generator().manual_seed(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype):
    x = (torch.randn(7, 64, generator=GEN) * 3).to(dtype)
    hf = LlamaRMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(64, generator=GEN))
    assert torch.equal(rms_norm(x, hf.weight, 1e-6), hf(x))
    residual = torch.randn(7, 64, generator=GEN).to(dtype)
    out, new_residual = rms_norm(x, hf.weight, 1e-6, residual)
    assert torch.equal(new_residual, x + residual)
    assert torch.equal(out, hf(x + residual))


@pytest.mark.parametrize("scaling", [{}, {"rope_type": "linear", "factor": 4.0}])
def test_neox_rotary_matches_transformers(scaling):
    tokens, heads, kv_heads, dim = 9, 4, 2, 32
    positions = torch.tensor([0, 1, 2, 17, 100, 5, 63, 64, 200])
    inv_freq = inverse_frequencies(dim, 50000.0, scaling)
    freqs = torch.outer(torch.arange(256, dtype=torch.float32), inv_freq)
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    q = torch.randn(tokens, heads, dim, generator=GEN)
    k = torch.randn(tokens, kv_heads, dim, generator=GEN)
    ours_q, ours_k = rotary_embedding(positions, q, k, cache, is_neox=True)
    # transformers: cos/sin [batch, seq, dim] from inv_freq, q/k [batch, heads, seq, dim].
    emb = torch.cat((freqs, freqs), dim=-1)[positions]
    hf_q, hf_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb.cos()[None], emb.sin()[None]
    )
    torch.testing.assert_close(ours_q, hf_q[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(ours_k, hf_k[0].transpose(0, 1), rtol=0, atol=0)


def test_gptj_rotary_rotates_interleaved_pairs():
    dim = 8
    positions = torch.tensor([3])
    inv_freq = inverse_frequencies(dim, 10000.0, {})
    freqs = torch.outer(torch.arange(8, dtype=torch.float32), inv_freq)
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    q = torch.randn(1, 1, dim, generator=GEN)
    out, _ = rotary_embedding(positions, q, q.clone(), cache, is_neox=False)
    angles = 3 * inv_freq
    for i in range(dim // 2):
        x, y = q[0, 0, 2 * i], q[0, 0, 2 * i + 1]
        c, s = torch.cos(angles[i]), torch.sin(angles[i])
        torch.testing.assert_close(out[0, 0, 2 * i], x * c - y * s)
        torch.testing.assert_close(out[0, 0, 2 * i + 1], y * c + x * s)


def test_llama3_scaling_keeps_high_frequencies_and_slows_low_ones():
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    plain = inverse_frequencies(32, 10000.0, {})
    scaled = inverse_frequencies(32, 10000.0, scaling)
    wavelen = 2 * torch.pi / plain
    high = wavelen < 64 / 4
    low = wavelen > 64 / 1
    assert torch.equal(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 8)
    middle = ~high & ~low
    assert middle.any() and bool(
        ((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / 8)).all()
    )


def test_silu_and_mul():
    x = torch.randn(5, 12, generator=GEN)
    torch.testing.assert_close(silu_and_mul(x), torch.nn.functional.silu(x[:, :6]) * x[:, 6:])


def test_dispatch_picks_the_cpu_kernels_on_cpu_and_rejects_unknown_backends():
    auto = get_ops("auto", "cpu")
    assert auto.name == "cpu" and auto.variant == cpu_build.chosen_isa().name
    assert get_ops("cpu") is auto and get_ops("torch") is TORCH
    assert {"cpu", "torch"} <= set(available_backends())
    with pytest.raises(ValueError, match="runs on CPU tensors"):
        get_ops("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        get_ops("flash")


def test_auto_falls_back_to_torch_where_the_extension_cannot_build(monkeypatch, caplog):
    def no_compiler():
        raise cpu_build.BuildError("no C++ compiler (g++)")

    monkeypatch.setattr(dispatch, "cpu_kernel_ops", no_compiler)
    dispatch._cpu_or_reference.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="pagoda.kernels"):
            assert get_ops("auto", "cpu") is TORCH
        assert "no C++ compiler" in caplog.text
    finally:
        dispatch._cpu_or_reference.cache_clear()
