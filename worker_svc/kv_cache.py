"""The paged KV cache: per layer, K and V of ``[num_blocks, block_size, kv_heads, head_dim]``.

The scheduler hands out block ids; a block id names the same rows in every layer.
One allocation holds all layers, each Attention module is bound to its slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from worker_svc.layers.attention import Attention
from worker_svc.memory import advise_huge_pages


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def bytes_per_block(self, block_size: int) -> int:
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * itemsize


def attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def cache_shape(model: nn.Module, dtype: torch.dtype) -> KVCacheShape:
    layers = attention_layers(model)
    kinds = {(a.num_kv_heads, a.head_dim) for a in layers}
    if len(kinds) != 1:
        raise ValueError(f"layers with different KV shapes are not supported: {sorted(kinds)}")
    (kv_heads, head_dim) = kinds.pop()
    return KVCacheShape(len(layers), kv_heads, head_dim, dtype)


def blocks_for_memory(shape: KVCacheShape, block_size: int, memory_bytes: int) -> int:
    return memory_bytes // shape.bytes_per_block(block_size)


def gpu_cache_memory(device: torch.device, utilization: float) -> int:
    """What is left of ``utilization`` x the GPU's memory once the model is loaded."""
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    # Keep room for activations: a step's intermediate tensors are a small fraction.
    return max(0, int(total * utilization) - used)


def allocate(
    model: nn.Module, shape: KVCacheShape, num_blocks: int, block_size: int, device: torch.device
) -> torch.Tensor:
    """One tensor ``[2, layers, blocks, block_size, kv_heads, head_dim]``, bound to the layers.

    Zeroed at once: writing every page puts the whole cache in memory now, so the
    worker's memory is what it will be from the start and does not climb as blocks are
    first used (which would look like a leak). On a CPU the pages are huge ones where
    the kernel grants them (``advise_huge_pages``), asked for before that first write.
    """
    cache = torch.empty(
        2, shape.num_layers, num_blocks, block_size, shape.num_kv_heads, shape.head_dim,
        dtype=shape.dtype, device=device,
    )  # fmt: skip
    advise_huge_pages(cache)
    cache.zero_()
    for i, layer in enumerate(attention_layers(model)):
        layer.k_cache = cache[0, i]
        layer.v_cache = cache[1, i]
    return cache
