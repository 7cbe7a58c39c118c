"""The Triton cache write against the torch reference, bit for bit.

Without a GPU it runs under Triton's interpreter on CPU tensors (see conftest). Each
case writes a step's keys and values (views of a fused qkv row, as the attention
layer passes them) into blocks scattered over a shuffled cache, with padding slots of
-1, and checks every cache slot: written ones hold the new rows, the others are as
they were.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from pagoda_kernels import cache
from pagoda_kernels import triton_cache as tc
from pagoda_kernels.triton_support import LAUNCHES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parents[2]
NUM_BLOCKS = 12
HEADS = 4


def scattered_slots(lengths: list[int], block_size: int, seed: int) -> torch.Tensor:
    """Slots for sequences of ``lengths`` over shuffled blocks, a -1 after each sequence."""
    gen = torch.Generator().manual_seed(seed)
    free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    slots = []
    for length in lengths:
        blocks = [free.pop() for _ in range(-(-length // block_size))]
        start = int(torch.randint(0, block_size, (1,), generator=gen)) if length == 1 else 0
        slots += [blocks[(start + i) // block_size] * block_size + (start + i) % block_size
                  for i in range(length)]  # fmt: skip
        slots.append(-1)
    return torch.tensor(slots, dtype=torch.long, device=DEVICE)


def step_inputs(
    tokens: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values as views into a fused qkv row (token stride > kv_heads * head_dim)."""
    gen = torch.Generator().manual_seed(tokens * head_dim)
    q_size, kv_size = HEADS * head_dim, kv_heads * head_dim
    qkv = torch.randn(tokens, q_size + 2 * kv_size, generator=gen).to(dtype=dtype, device=DEVICE)
    _, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)


def filled_caches(
    block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value caches full of earlier values, slices of one tensor as the worker has."""
    gen = torch.Generator().manual_seed(block_size)
    shape = (2, NUM_BLOCKS, block_size, kv_heads, head_dim)
    both = torch.randn(shape, generator=gen).to(dtype=dtype, device=DEVICE)
    return both[0], both[1]


def check_against_reference(key, value, key_cache, value_cache, slots) -> None:
    """Run both implementations on copies of the caches; every slot must agree exactly."""
    inputs = [(t, t.clone()) for t in (key, value, slots)]
    ours_k, ours_v = key_cache.clone(), value_cache.clone()
    want_k, want_v = key_cache.clone(), value_cache.clone()
    before = LAUNCHES[tc.KERNEL]
    tc.reshape_and_cache(key, value, ours_k, ours_v, slots)
    assert LAUNCHES[tc.KERNEL] == before + 1
    cache.reshape_and_cache(key, value, want_k, want_v, slots)
    assert torch.equal(ours_k, want_k)
    assert torch.equal(ours_v, want_v)
    for tensor, copy in inputs:
        assert torch.equal(tensor, copy)
    written = torch.zeros(ours_k.shape[0] * ours_k.shape[1], dtype=torch.bool, device=DEVICE)
    written[slots[slots >= 0]] = True
    for ours, old in ((ours_k, key_cache), (ours_v, value_cache)):
        flat, old_flat = ours.flatten(0, 1), old.flatten(0, 1)
        assert torch.equal(flat[~written], old_flat[~written])


@pytest.mark.parametrize(("kv_heads", "head_dim"), [(2, 64), (1, 128), (8, 128)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prefill_and_decode_slots_match_reference(dtype, block_size, kv_heads, head_dim):
    # A prefill longer than a block, one that fills a block exactly, and two decodes.
    slots = scattered_slots([block_size + 3, block_size, 1, 1], block_size, seed=block_size)
    key, value = step_inputs(len(slots), kv_heads, head_dim, dtype)
    assert not key.is_contiguous()
    key_cache, value_cache = filled_caches(block_size, kv_heads, head_dim, dtype)
    check_against_reference(key, value, key_cache, value_cache, slots)


def test_all_padding_writes_nothing():
    key, value = step_inputs(4, 2, 64, torch.bfloat16)
    key_cache, value_cache = filled_caches(16, 2, 64, torch.bfloat16)
    check_against_reference(key, value, key_cache, value_cache, torch.full((4,), -1, device=DEVICE))


def test_contiguous_float32_rows_into_a_bfloat16_cache_are_rounded_like_the_reference():
    slots = scattered_slots([5, 1], 16, seed=3)
    gen = torch.Generator().manual_seed(5)
    key = torch.randn(len(slots), 2, 64, generator=gen).to(DEVICE)
    value = torch.randn(len(slots), 2, 64, generator=gen).to(DEVICE)
    key_cache, value_cache = filled_caches(16, 2, 64, torch.bfloat16)
    check_against_reference(key, value, key_cache, value_cache, slots)


def test_small_tiles_split_the_work_over_many_programs(monkeypatch):
    monkeypatch.setattr(tc, "_INTERPRET_TILE", 64)
    slots = scattered_slots([20, 1, 3], 16, seed=4)
    key, value = step_inputs(len(slots), 2, 64, torch.float16)
    key_cache, value_cache = filled_caches(16, 2, 64, torch.float16)
    assert tc._launch_blocks(len(slots), 128, interpret=True) == (1, 64)
    check_against_reference(key, value, key_cache, value_cache, slots)


def test_no_tokens_launch_nothing():
    key, value = step_inputs(0, 2, 64, torch.float32)
    key_cache, value_cache = filled_caches(16, 2, 64, torch.float32)
    before = LAUNCHES[tc.KERNEL]
    tc.reshape_and_cache(key, value, key_cache, value_cache, torch.zeros(0, dtype=torch.long))
    assert LAUNCHES[tc.KERNEL] == before


def test_every_variant_compiles_for_gpus():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "pagoda_kernels.aot", "pagoda_kernels.triton_cache"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
