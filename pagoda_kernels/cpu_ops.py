"""Python faces of the CPU extension's operators (see cpu_build.py for how they are built).

Each function takes the torch reference's arguments and calls the operator of one
instruction-set variant (``ops``, first), so tests can run every variant this CPU has
side by side. Where a call falls outside what the C++ covers (a weight in another dtype
than the activations, a rotary table narrower than the head), it goes to the reference.
"""

from __future__ import annotations

from functools import cache

import torch

from pagoda_kernels import norm, rotary

# Operators that write their outputs in place and return nothing.
_MUTATING = ("reshape_and_cache", "rotary_embedding")


@cache
def register_fakes(namespace: str) -> None:
    """Shapes of each operator's outputs, so torch.compile can trace through them."""

    def fake(name):
        return torch.library.register_fake(f"{namespace}::{name}")

    for name in _MUTATING:
        fake(name)(lambda *args, **kwargs: None)
    fake("paged_attention_decode")(lambda query, *args: torch.empty_like(query))
    fake("paged_attention_prefill")(lambda query, *args: torch.empty_like(query))
    fake("rms_norm")(lambda x, weight, eps: torch.empty_like(x))
    fake("fused_add_rms_norm")(
        lambda x, residual, weight, eps: (torch.empty_like(x), torch.empty_like(x))
    )
    fake("silu_and_mul")(lambda x: x.new_empty(x.shape[0], x.shape[1] // 2))
    fake("argmax_rows")(lambda x: x.new_empty(x.shape[0], dtype=torch.long))


def reshape_and_cache(
    ops,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """``pagoda_kernels.cache.reshape_and_cache`` in C++: no mask, no copy of the kept rows."""
    ops.reshape_and_cache(
        key.to(key_cache.dtype), value.to(value_cache.dtype), key_cache, value_cache,
        slot_mapping.to(torch.long),
    )  # fmt: skip


def paged_attention_decode(
    ops,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """``pagoda_kernels.attention.paged_attention_decode``, reading blocks in place."""
    out = ops.paged_attention_decode(
        query.to(key_cache.dtype), key_cache, value_cache, block_tables.to(torch.long),
        context_lens, float(scale), sliding_window,
    )  # fmt: skip
    return out.to(query.dtype)


def paged_attention_prefill(
    ops,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """``pagoda_kernels.attention.paged_attention_prefill``: tiles of query rows per KV head.

    A short multi-query decode (1 + k queries per sequence, as speculative decoding
    verifies) is the same call: its queries fit one tile, so each KV head's blocks are
    read once for all of them.
    """
    out = ops.paged_attention_prefill(
        query.to(key_cache.dtype), key_cache, value_cache, block_tables.to(torch.long),
        query_start_loc, context_lens, float(scale), sliding_window,
    )  # fmt: skip
    return out.to(query.dtype)


def rms_norm(
    ops,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``pagoda_kernels.norm.rms_norm``: one pass per row, the residual add fused."""
    same = weight.dtype == x.dtype and (residual is None or residual.dtype == x.dtype)
    if not same:
        return norm.rms_norm(x, weight, eps, residual)
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if residual is None:
        return ops.rms_norm(rows, weight, float(eps)).view(shape)
    out, total = ops.fused_add_rms_norm(rows, residual.reshape(-1, shape[-1]), weight, float(eps))
    return out.view(shape), total.view(shape)


def rotary_embedding(
    ops,
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pagoda_kernels.rotary.rotary_embedding``, but in place: returns query and key rotated."""
    fits = (
        query.dtype == key.dtype
        and query.stride(-1) == 1
        and key.stride(-1) == 1
        and cos_sin_cache.shape[-1] == query.shape[-1]
    )
    if not fits:
        return rotary.rotary_embedding(positions, query, key, cos_sin_cache, is_neox)
    ops.rotary_embedding(positions, query, key, cos_sin_cache, is_neox)
    return query, key


def silu_and_mul(ops, x: torch.Tensor) -> torch.Tensor:
    """``pagoda_kernels.activation.silu_and_mul`` in one pass."""
    rows = x.reshape(-1, x.shape[-1])
    return ops.silu_and_mul(rows).view(*x.shape[:-1], x.shape[-1] // 2)


def argmax(ops, x: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(x, -1)`` of a 2-D tensor (first maximum; NaN counts as the maximum),
    read in its own dtype: greedy sampling without a float32 copy of the logits."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return ops.argmax_rows(x)
