"""The C++ KV-cache write equals the torch reference, on every instruction set this CPU runs."""

from __future__ import annotations

import pytest
import torch

from pagoda_kernels import cache, cpu_build, cpu_ops
from tests.pagoda_kernels.conftest import VARIANTS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size,kv_heads,head_dim", [(16, 4, 64), (4, 1, 80), (32, 8, 128)])
def test_every_token_lands_in_its_slot(ops, dtype, block_size, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(block_size * kv_heads + head_dim)
    tokens, num_blocks = 37, 12
    # q, k and v side by side, as the fused projection leaves them: strided rows.
    fused = torch.randn(tokens, 3, kv_heads, head_dim, generator=gen).to(dtype)
    key, value = fused[:, 1], fused[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[::7] = -1  # padding tokens are not stored
    shape = (num_blocks, block_size, kv_heads, head_dim)
    want_k, want_v = torch.randn(shape, generator=gen).to(dtype), torch.zeros(shape, dtype=dtype)
    got_k, got_v = want_k.clone(), want_v.clone()
    cache.reshape_and_cache(key, value, want_k, want_v, slots)
    cpu_ops.reshape_and_cache(ops, key, value, got_k, got_v, slots)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


def test_a_slot_outside_the_cache_is_refused(ops):
    key = torch.randn(2, 1, 8)
    k_cache, v_cache = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_ops.reshape_and_cache(ops, key, key, k_cache, v_cache, torch.tensor([0, 8]))


def test_an_isa_this_cpu_lacks_is_refused_by_name(monkeypatch):
    missing = [isa for isa in cpu_build.ISAS if isa.name not in VARIANTS]
    if not missing:
        monkeypatch.setattr(cpu_build, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
        missing = [cpu_build.isa("avx512")]
    monkeypatch.setenv("PAGODA_CPU_ISA", missing[0].name)
    with pytest.raises(ValueError, match="this CPU lacks"):
        cpu_build.chosen_isa()


def test_the_build_key_follows_the_sources_and_the_flags():
    a, b = cpu_build.ISAS[0], cpu_build.ISAS[-1]
    assert cpu_build.build_key(a) != cpu_build.build_key(b)
    assert cpu_build.build_key(a) == cpu_build.build_key(a)
