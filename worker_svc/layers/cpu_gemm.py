"""Matrix products with weights pre-packed for oneDNN, on the CPU.

``F.linear`` hands oneDNN a plain row-major weight, which it re-packs into its
blocked layout on every call. Packing once at load time and calling oneDNN's linear
directly is bit-identical in bfloat16 and, on a 2-core AVX-512 CPU, 12-25% faster at
decode batch sizes (the 32k-vocabulary LM head of a small model: 7.3 -> 5.6 ms at 64
rows) and ~10% at prefill sizes. The packed tensor is opaque: it serves this product
only, so a layer that packs drops its plain weight.
"""

from __future__ import annotations

import torch

_PACK_BATCH_HINT = 64  # the row count oneDNN tunes the layout for; any count works


def available(dtype: torch.dtype) -> bool:
    """Whether this torch build can pack weights of ``dtype`` and multiply with them."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")):
        return False
    try:
        weight = torch.randn(24, 16).to(dtype)
        x = torch.randn(3, 16).to(dtype)
        out = linear(x, pack(weight), None)
    except (RuntimeError, AttributeError):
        return False
    return bool(torch.allclose(out.float(), (x @ weight.t()).float(), rtol=1e-2, atol=1e-2))


def pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_BATCH_HINT)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack_model(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Pack every linear layer and LM head of a loaded model; returns how many were packed."""
    if not available(dtype):
        return 0
    layers = [m for m in model.modules() if hasattr(m, "pack_weight")]
    for layer in layers:
        layer.pack_weight()
    return len(layers)
