"""The attention layer: store the step's K/V in the paged cache, then attend through it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagoda_kernels.dispatch import Ops


@dataclass
class AttentionMetadata:
    """How one step's flattened tokens map onto sequences and cache slots.

    Built once per step by the model runner and shared by every layer. The batch is
    ordered decodes first (one query token each), then prefill chunks, so each part
    goes to its own kernel.
    """

    slot_mapping: torch.Tensor  # [T] cache slot of every token
    num_decodes: int  # the first num_decodes tokens are one-token decodes
    decode_block_tables: torch.Tensor  # [num_decodes, width]
    decode_context_lens: torch.Tensor  # [num_decodes]
    prefill_block_tables: torch.Tensor  # [num_prefills, width]
    prefill_query_start_loc: torch.Tensor  # [num_prefills + 1], offsets within the prefill part
    prefill_context_lens: torch.Tensor  # [num_prefills]
    num_tokens: int


class Attention(nn.Module):
    """Multi-head attention with GQA/MQA and an optional sliding window over the paged cache."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        ops: Ops,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.ops = ops
        self.sliding_window = sliding_window
        # Bound to this layer's slices of the KV cache when the cache is allocated.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    # Compiled models run attention as it is (a graph break on each side): its shapes
    # depend on the step's context lengths, and the cache write it makes in place would
    # otherwise be functionalized into a copy of the whole KV cache on every step.
    @torch.compiler.disable
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        tokens = q.shape[0]
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        ops = self.ops
        ops.reshape_and_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        nd = meta.num_decodes
        if nd == tokens:
            out = ops.paged_attention_decode(
                q, self.k_cache, self.v_cache, meta.decode_block_tables,
                meta.decode_context_lens, self.scale, self.sliding_window,
            )  # fmt: skip
            return out.reshape(tokens, -1)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = ops.paged_attention_decode(
                q[:nd], self.k_cache, self.v_cache, meta.decode_block_tables,
                meta.decode_context_lens, self.scale, self.sliding_window,
            )  # fmt: skip
        out[nd:] = ops.paged_attention_prefill(
            q[nd:], self.k_cache, self.v_cache, meta.prefill_block_tables,
            meta.prefill_query_start_loc, meta.prefill_context_lens, self.scale,
            self.sliding_window,
        )  # fmt: skip
        return out.reshape(tokens, -1)
