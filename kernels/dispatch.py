"""Which implementation of the hot operations a model uses.

Every backend provides the same functions with the same signatures; the model's
layers call them through an :class:`Ops` so that choosing a backend is one
argument (``attention_backend``) rather than a branch in every layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import activation, attention, cache, norm, rotary


@dataclass(frozen=True)
class Ops:
    """The operations one backend provides."""

    name: str
    reshape_and_cache: Callable[..., None]
    paged_attention_decode: Callable[..., torch.Tensor]
    paged_attention_prefill: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
    rotary_embedding: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[..., torch.Tensor]


TORCH = Ops(
    name="torch",
    reshape_and_cache=cache.reshape_and_cache,
    paged_attention_decode=attention.paged_attention_decode,
    paged_attention_prefill=attention.paged_attention_prefill,
    rms_norm=norm.rms_norm,
    rotary_embedding=rotary.rotary_embedding,
    silu_and_mul=activation.silu_and_mul,
)

_BACKENDS: dict[str, Ops] = {"torch": TORCH}


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_ops(backend: str = "auto", device: torch.device | str = "cpu") -> Ops:
    """The ops for ``backend``; ``auto`` picks the fastest one available for ``device``."""
    if backend == "auto":
        return TORCH
    try:
        return _BACKENDS[backend]
    except KeyError:
        raise ValueError(
            f"unknown attention backend {backend!r}; available: auto, "
            + ", ".join(available_backends())
        ) from None
