"""Paged attention over the KV cache: decodes, and prefill chunks with a cached prefix.

These are the torch reference implementations: the CPU path, and what the Triton
kernels are tested against. Both work on a whole step at once, batched over
sequences: each sequence's keys and values are gathered block by block from the
cache (one ``index_select``), queries are padded to the longest in the batch, and
one masked softmax per KV head covers every sequence. Scores and softmax are in
float32 whatever the cache dtype.

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
    return _attend(query.unsqueeze(1), key, value, visible.unsqueeze(1), scale).squeeze(1)


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
    return _attend(padded, key, value, visible, scale)[real]


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


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Masked attention of ``query [S, Q, H, D]`` over ``key/value [S, L, KVH, D]``.

    ``visible [S, Q, L]`` says which keys each query sees (at least one per row).
    One batched matmul pair per KV head: its ``H / KVH`` query heads are stacked as
    extra query rows, so no key is copied per query head.
    """
    num_seqs, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    group = heads // kv_heads
    grouped = query.view(num_seqs, q_len, kv_heads, group, head_dim)
    hidden = ~visible.unsqueeze(2)  # [S, Q, 1, L]
    out = torch.empty_like(grouped)
    for h in range(kv_heads):
        q = grouped[:, :, h].reshape(num_seqs, q_len * group, head_dim).float()
        scores = torch.bmm(q, key[:, :, h].float().transpose(1, 2)).mul_(scale)
        scores = scores.view(num_seqs, q_len, group, -1).masked_fill_(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(num_seqs, q_len * group, -1)
        mixed = torch.bmm(probs, value[:, :, h].float())
        out[:, :, h] = mixed.view(num_seqs, q_len, group, head_dim).to(out.dtype)
    return out.view(num_seqs, q_len, heads, head_dim)
