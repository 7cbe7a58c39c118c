"""Paged attention over the KV cache: decodes, and prefill chunks with a cached prefix.

These are the torch reference implementations: the CPU path, and what the Triton
kernels are tested against. Both work on a whole step at once, batched over
sequences: each sequence's keys and values are gathered block by block from the
cache (one ``index_select``) and queries are padded to the longest in the batch.
Prefill chunks then go through torch's fused attention with an explicit mask;
decodes (one query each, where that kernel is slow) through two batched matmuls
with the softmax in float32.

Conventions (the same for every backend):
- caches are ``[num_blocks, block_size, kv_heads, head_dim]``;
- ``block_tables[s]`` lists sequence ``s``'s blocks in order (padded with any valid id);
- ``context_lens[s]`` counts all of ``s``'s tokens whose K/V are in the cache,
  including the ones queried in this step (their K/V are written first);
- a query at position ``p`` sees keys ``j <= p``, and with a sliding window ``w`` only
  those with ``p - j < w`` (as transformers' Mistral does);
- query heads ``h`` use KV head ``h // (heads // kv_heads)`` (GQA and MQA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One query token per sequence (``[S, heads, head_dim]``) at position ``context_len - 1``."""
    key, value = _gather(key_cache, value_cache, block_tables)
    positions = torch.arange(key.shape[1], device=query.device)
    last = (context_lens - 1).unsqueeze(1)
    visible = positions.unsqueeze(0) <= last
    if sliding_window is not None:
        visible &= positions.unsqueeze(0) > last - sliding_window
    out = _attend(query.unsqueeze(1), key, value, visible.unsqueeze(1), scale).squeeze(1)
    return out.to(query.dtype)


def paged_attention_prefill(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Chunks of new tokens packed in ``query [T, heads, head_dim]``, causal over their sequence.

    Sequence ``s`` owns rows ``query_start_loc[s] : query_start_loc[s + 1]``: its last
    ``q_len`` tokens. They attend to the cached prefix and to each other, causally.
    """
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    num_seqs = q_lens.shape[0]
    max_q = int(q_lens.max())
    rows = torch.arange(max_q, device=query.device).unsqueeze(0)
    real = rows < q_lens.unsqueeze(1)  # [S, max_q]
    padded = query.new_zeros(num_seqs, max_q, *query.shape[1:])
    padded[real] = query
    key, value = _gather(key_cache, value_cache, block_tables)
    q_positions = (context_lens - q_lens).unsqueeze(1) + rows  # [S, max_q]
    k_positions = torch.arange(key.shape[1], device=query.device)
    visible = k_positions.view(1, 1, -1) <= q_positions.unsqueeze(2)
    if sliding_window is not None:
        visible &= k_positions.view(1, 1, -1) > q_positions.unsqueeze(2) - sliding_window
    # torch's fused attention (flash on CPU) takes the mask as is; at prefill sizes it is
    # twice as fast as the explicit matmuls (for one query per sequence it is slower).
    out = F.scaled_dot_product_attention(
        padded.transpose(1, 2).to(key.dtype),
        key.transpose(1, 2),
        value.transpose(1, 2),
        attn_mask=visible.unsqueeze(1),
        scale=scale,
        enable_gqa=query.shape[1] != key.shape[2],
    )
    return out.transpose(1, 2)[real].to(query.dtype)


def _gather(
    key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's keys and values, ``[S, blocks * block_size, kv_heads, head_dim]``."""
    num_blocks, block_size, kv_heads, head_dim = key_cache.shape
    num_seqs, width = block_tables.shape
    index = block_tables.reshape(-1).to(torch.long)
    shape = (num_seqs, width * block_size, kv_heads, head_dim)
    key = key_cache.view(num_blocks, -1).index_select(0, index).view(shape)
    value = value_cache.view(num_blocks, -1).index_select(0, index).view(shape)
    return key, value


# Up to this many KV heads, one batched matmul over all heads (block-diagonal queries)
# beats a loop over heads, whose strided per-head slices each cost a copy: measured on
# a 2-core CPU at 64 sequences x 256 tokens x 4 KV heads, 2.4 ms against 4.2 ms a layer.
BLOCK_DIAGONAL_MAX_KV_HEADS = 4


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Masked attention of ``query [S, Q, H, D]`` over ``key/value [S, L, KVH, D]``.

    ``visible [S, Q, L]`` says which keys each query sees (at least one per row).
    The matmuls run in the cache's dtype (no float32 copy of the keys and values,
    which would cost more than the attention itself on a CPU); the softmax runs in
    float32.
    """
    query = query.to(key.dtype)
    if key.shape[2] <= BLOCK_DIAGONAL_MAX_KV_HEADS:
        out = _attend_all_heads(query, key, value, visible, scale)
    else:
        out = _attend_per_kv_head(query, key, value, visible, scale)
    return out


def _attend_all_heads(query, key, value, visible, scale) -> torch.Tensor:
    """One batched matmul pair for every head of every query of a sequence.

    Each query head is spread over all KV heads' dimensions with zeros outside its
    own KV head's slice, so a sequence's scores are one ``[Q*H, KVH*D] @ [KVH*D, L]``
    product against its keys exactly as gathered (no copy, no per-head loop), at the
    price of KVH times the (small) attention arithmetic.
    """
    num_seqs, q_len, heads, head_dim = query.shape
    _, length, kv_heads, _ = key.shape
    group = heads // kv_heads
    owner = torch.arange(heads, device=query.device) // group  # KV head of each query head
    spread = torch.zeros(
        num_seqs, q_len, heads, kv_heads, head_dim, dtype=query.dtype, device=query.device
    )
    spread[:, :, torch.arange(heads, device=query.device), owner] = query
    flat_k = key.reshape(num_seqs, length, kv_heads * head_dim)
    scores = torch.bmm(spread.view(num_seqs, q_len * heads, -1), flat_k.transpose(1, 2))
    scores = scores.float().mul_(scale).view(num_seqs, q_len, heads, length)
    scores.masked_fill_(~visible.unsqueeze(2), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(num_seqs, q_len * heads, length)
    mixed = torch.bmm(probs, value.reshape(num_seqs, length, kv_heads * head_dim))
    mixed = mixed.view(num_seqs, q_len, heads, kv_heads, head_dim)
    index = owner.view(1, 1, heads, 1, 1).expand(num_seqs, q_len, heads, 1, head_dim)
    return mixed.gather(3, index).view(num_seqs, q_len, heads, head_dim)


def _attend_per_kv_head(query, key, value, visible, scale) -> torch.Tensor:
    """One batched matmul pair per KV head, its query heads stacked as extra rows."""
    num_seqs, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    group = heads // kv_heads
    grouped = query.view(num_seqs, q_len, kv_heads, group, head_dim)
    hidden = ~visible.unsqueeze(2)  # [S, Q, 1, L]
    out = torch.empty_like(grouped)
    for h in range(kv_heads):
        q = grouped[:, :, h].reshape(num_seqs, q_len * group, head_dim)
        scores = torch.bmm(q, key[:, :, h].transpose(1, 2)).float().mul_(scale)
        scores = scores.view(num_seqs, q_len, group, -1).masked_fill_(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(num_seqs, q_len * group, -1)
        mixed = torch.bmm(probs.to(value.dtype), value[:, :, h])
        out[:, :, h] = mixed.view(num_seqs, q_len, group, head_dim)
    return out.view(num_seqs, q_len, heads, head_dim)
