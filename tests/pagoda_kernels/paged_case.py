"""Paged KV caches with known contents, and a naive float64 attention to check against."""

from __future__ import annotations

import random

import torch


def naive_attention(
    q: torch.Tensor,  # [q_len, H, D] queries at positions ctx - q_len ..< ctx
    keys: torch.Tensor,  # [ctx, KVH, D]
    values: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    q_len, heads, _ = q.shape
    ctx, kv_heads, _ = keys.shape
    group = heads // kv_heads
    out = torch.zeros(q_len, heads, q.shape[2], dtype=torch.float64)
    for i in range(q_len):
        p = ctx - q_len + i
        for h in range(heads):
            kh = h // group
            js = [j for j in range(p + 1) if window is None or p - j < window]
            scores = torch.stack([(q[i, h].double() * keys[j, kh].double()).sum() for j in js])
            probs = torch.softmax(scores * scale, dim=0)
            out[i, h] = sum(w * values[j, kh].double() for w, j in zip(probs, js, strict=True))
    return out


class PagedCase:
    """Sequences with random contents scattered over a shuffled block pool."""

    def __init__(self, ctx_lens, block_size, kv_heads, head_dim, dtype, seed=0):
        gen = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        self.block_size = block_size
        need = [-(-c // block_size) for c in ctx_lens]
        num_blocks = sum(need) + 3
        ids = list(range(num_blocks))
        rng.shuffle(ids)
        self.tables = []
        for n in need:
            self.tables.append([ids.pop() for _ in range(n)])
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.key_cache = torch.randn(shape, generator=gen).to(dtype)
        self.value_cache = torch.randn(shape, generator=gen).to(dtype)
        self.ctx_lens = ctx_lens

    def dense(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        bs = self.block_size
        rows = [self.tables[s][p // bs] * bs + p % bs for p in range(self.ctx_lens[s])]
        flat_k = self.key_cache.flatten(0, 1)
        flat_v = self.value_cache.flatten(0, 1)
        return flat_k[rows], flat_v[rows]

    def block_tables(self) -> torch.Tensor:
        width = max(len(t) for t in self.tables)
        return torch.tensor([t + [0] * (width - len(t)) for t in self.tables])
