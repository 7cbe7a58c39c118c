"""Normalisation layers with loadable, uninitialised parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagoda_kernels.dispatch import Ops


class RMSNorm(nn.Module):
    """RMS norm through the kernel dispatch; optionally fused with the residual add."""

    def __init__(self, size: int, eps: float, ops: Ops):
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class LayerNorm(nn.Module):
    """LayerNorm whose parameters the loader fills (no init cost); ``affine=False`` has none."""

    def __init__(self, size: int, eps: float, affine: bool = True, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False) if affine else None
        has_bias = affine and bias
        self.bias = nn.Parameter(torch.empty(size), requires_grad=False) if has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
