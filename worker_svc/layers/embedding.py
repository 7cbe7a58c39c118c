"""Token embeddings and the LM head, split over the vocabulary across ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker_svc.layers import cpu_gemm


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary; rows outside it embed to zero."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.tp_size = tp_size
        self.shard_size = -(-num_embeddings // tp_size)
        self.start = tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, embedding_dim), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard=None) -> None:
        part = loaded[self.start : self.start + self.shard_size]
        if part.shape[1] != param.shape[1] or loaded.shape[0] != self.num_embeddings:
            raise ValueError(
                f"embedding: checkpoint shape {tuple(loaded.shape)} != "
                f"({self.num_embeddings}, {param.shape[1]})"
            )
        param.data.zero_()
        param.data[: part.shape[0]].copy_(part)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.shard_size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        torch.distributed.all_reduce(out)
        return out


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states to logits; may share its weight with the embedding (tied)."""

    packed: torch.Tensor | None = None
    tied = False

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight
        self.tied = True

    def pack_weight(self) -> None:
        """Keep oneDNN's pre-packed copy for the head; a tied weight stays for the embedding."""
        self.packed = cpu_gemm.pack(self.weight.data)
        if not self.tied:
            del self.weight
            self.weight = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            out = cpu_gemm.linear(hidden, self.packed, None)
        else:
            out = F.linear(hidden, self.weight)
        if self.tp_size > 1:
            parts = [torch.empty_like(out) for _ in range(self.tp_size)]
            torch.distributed.all_gather(parts, out)
            out = torch.cat(parts, dim=-1)
        return out[..., : self.num_embeddings]
