"""Linear layers that split across a tensor-parallel group; one rank is the degenerate case.

A column-parallel layer holds a slice of the output features, a row-parallel one a
slice of the input features (its partial sums are all-reduced). Each layer has a
``weight_loader`` that takes a full checkpoint tensor and keeps its own slice, so
the model's weight mapping never depends on the group size. Parameters are made
with ``torch.empty``: the loader fills every one of them, so random init is waste.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker_svc.layers import cpu_gemm


class LinearBase(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.packed: torch.Tensor | None = None

    def pack_weight(self) -> None:
        """Replace the weight by oneDNN's pre-packed copy (CPU only, after loading)."""
        self.packed = cpu_gemm.pack(self.weight.data)
        del self.weight
        self.weight = None

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed is not None:
            return cpu_gemm.linear(x, self.packed, bias)
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


def _copy(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    _expect(loaded, tuple(param.shape), what)
    param.copy_(loaded)


def _expect(loaded: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    """Check a whole checkpoint tensor before any rank takes its slice of it."""
    if tuple(loaded.shape) != shape:
        raise ValueError(f"{what}: checkpoint shape {tuple(loaded.shape)} != {shape}")


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole layer."""

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard=None) -> None:
        _copy(param.data, loaded, "linear")


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp_rank=0, tp_size=1):
        if out_features % tp_size:
            raise ValueError(f"{out_features} output features do not split over {tp_size} ranks")
        super().__init__(in_features, out_features // tp_size, bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard=None) -> None:
        size = param.shape[0]
        _expect(loaded, (size * self.tp_size, *param.shape[1:]), "column-parallel linear")
        _copy(param.data, loaded.narrow(0, self.tp_rank * size, size), "column-parallel linear")


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel layers fused along the output (gate and up projections)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, tp_rank=0, tp_size=1):
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: int) -> None:
        size = self.out_sizes[shard] // self.tp_size
        offset = sum(self.out_sizes[:shard]) // self.tp_size
        _expect(loaded, (self.out_sizes[shard], *param.shape[1:]), f"merged linear shard {shard}")
        part = loaded.narrow(0, self.tp_rank * size, size)
        _copy(param.data.narrow(0, offset, size), part, f"merged linear shard {shard}")


class QKVParallelLinear(ColumnParallelLinear):
    """The query, key and value projections fused, split by heads across ranks.

    With fewer KV heads than ranks, each KV head is replicated on several ranks.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        self.head_dim = head_dim
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.kv_replicas = max(1, tp_size // num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, out, bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None) -> None:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard is None:  # a checkpoint that stores q, k and v already fused (GPT-2)
            total_q = q_size * self.tp_size
            total_kv = kv_size * self.tp_size // self.kv_replicas
            if loaded.shape[0] != total_q + 2 * total_kv:
                raise ValueError(
                    f"fused qkv: {loaded.shape[0]} rows, expected {total_q + 2 * total_kv}"
                )
            q, k, v = loaded.split([total_q, total_kv, total_kv], dim=0)
            for part, name in ((q, "q"), (k, "k"), (v, "v")):
                self.weight_loader(param, part, name)
            return
        if shard == "q":
            offset, size, rank = 0, q_size, self.tp_rank
        else:
            offset = q_size if shard == "k" else q_size + kv_size
            size, rank = kv_size, self.tp_rank // self.kv_replicas
        ranks = self.tp_size if shard == "q" else self.tp_size // self.kv_replicas
        _expect(loaded, (size * ranks, *param.shape[1:]), f"qkv shard {shard}")
        part = loaded.narrow(0, rank * size, size)
        _copy(param.data.narrow(0, offset, size), part, f"qkv shard {shard}")


class RowParallelLinear(LinearBase):
    """Input features split across ranks; the partial outputs are summed over the group."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp_rank=0, tp_size=1):
        if in_features % tp_size:
            raise ValueError(f"{in_features} input features do not split over {tp_size} ranks")
        super().__init__(in_features // tp_size, out_features, bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard=None) -> None:
        if param.dim() == 1:  # the bias is added once, after the reduction
            _copy(param.data, loaded, "row-parallel bias")
            return
        size = param.shape[1]
        _expect(loaded, (param.shape[0], size * self.tp_size), "row-parallel linear")
        _copy(param.data, loaded.narrow(1, self.tp_rank * size, size), "row-parallel linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x, None)
        if self.tp_size > 1:
            torch.distributed.all_reduce(out)
        return out if self.bias is None else out + self.bias
