"""Writing a step's new keys and values into the paged KV cache."""

from __future__ import annotations

import torch


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``key``/``value`` rows ``[T, kv_heads, head_dim]`` at their cache slots.

    The caches are ``[num_blocks, block_size, kv_heads, head_dim]``; slot ``s`` is
    row ``s % block_size`` of block ``s // block_size``. A slot of -1 marks a padding
    token whose key and value are not stored.
    """
    num_blocks, block_size, kv_heads, head_dim = key_cache.shape
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    flat_k = key_cache.view(num_blocks * block_size, kv_heads, head_dim)
    flat_v = value_cache.view(num_blocks * block_size, kv_heads, head_dim)
    flat_k.index_copy_(0, slot_mapping, key.to(key_cache.dtype))
    flat_v.index_copy_(0, slot_mapping, value.to(value_cache.dtype))
