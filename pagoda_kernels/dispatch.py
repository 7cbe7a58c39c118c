"""Which implementation of the hot operations a model uses.

Every backend provides the same functions with the same signatures; the model's
layers call them through an :class:`Ops` so that choosing a backend is one
argument (``attention_backend``) rather than a branch in every layer.

``torch`` is the reference: what every kernel is tested against. ``cpu`` runs
pagoda's C++ extension (``cpu_build.py``), the variant for this CPU's instruction
set. ``triton`` runs the Triton kernels: on CUDA tensors compiled, and on CPU tensors
only under Triton's interpreter (``TRITON_INTERPRET=1``), which is how they are tested
without a GPU. ``auto`` takes Triton on CUDA and ``cpu`` elsewhere, or torch where
the extension cannot be built here (no compiler; said once in the log). The Triton
modules are imported only when that backend is asked for, so a CPU worker never pays
for importing triton.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial

import torch

from pagoda_kernels import activation, attention, norm, rotary
from pagoda_kernels import cache as kv_cache

log = logging.getLogger("pagoda.kernels")


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
    variant: str = ""  # which build of the backend, e.g. the CPU instruction set
    # Row-wise first-maximum index of 2-D logits in their own dtype, where the backend
    # has one faster than the sampler's own (which works on a float32 copy).
    argmax: Callable[[torch.Tensor], torch.Tensor] | None = None

    def describe(self) -> str:
        return f"{self.name} ({self.variant})" if self.variant else self.name


TORCH = Ops(
    name="torch",
    reshape_and_cache=kv_cache.reshape_and_cache,
    paged_attention_decode=attention.paged_attention_decode,
    paged_attention_prefill=attention.paged_attention_prefill,
    rms_norm=norm.rms_norm,
    rotary_embedding=rotary.rotary_embedding,
    silu_and_mul=activation.silu_and_mul,
)


@cache
def triton_ops() -> Ops:
    """The Triton kernels (imports triton on first use)."""
    from pagoda_kernels import triton_attention, triton_cache, triton_pointwise

    return Ops(
        name="triton",
        reshape_and_cache=triton_cache.reshape_and_cache,
        paged_attention_decode=triton_attention.paged_attention_decode,
        paged_attention_prefill=triton_attention.paged_attention_prefill,
        rms_norm=triton_pointwise.rms_norm,
        rotary_embedding=triton_pointwise.rotary_embedding,
        silu_and_mul=triton_pointwise.silu_and_mul,
    )


@cache
def cpu_kernel_ops() -> Ops:
    """The C++ kernels for this CPU (built first if missing; raises BuildError if it cannot)."""
    from pagoda_kernels import cpu_build, cpu_ops

    variant = cpu_build.chosen_isa()
    ops = cpu_build.load(variant.name)
    return Ops(
        name="cpu",
        reshape_and_cache=partial(cpu_ops.reshape_and_cache, ops),
        paged_attention_decode=partial(cpu_ops.paged_attention_decode, ops),
        paged_attention_prefill=partial(cpu_ops.paged_attention_prefill, ops),
        rms_norm=partial(cpu_ops.rms_norm, ops),
        rotary_embedding=partial(cpu_ops.rotary_embedding, ops),
        silu_and_mul=partial(cpu_ops.silu_and_mul, ops),
        variant=variant.name,
        argmax=partial(cpu_ops.argmax, ops),
    )


@cache
def _cpu_or_reference() -> Ops:
    """``cpu`` where the extension builds and loads here, else the torch reference."""
    from pagoda_kernels.cpu_build import BuildError

    try:
        return cpu_kernel_ops()
    except (BuildError, OSError, RuntimeError) as e:
        log.warning("the CPU kernels are unavailable, using the torch reference ops: %s", e)
        return TORCH


_BACKENDS: dict[str, Callable[[], Ops]] = {
    "torch": lambda: TORCH,
    "cpu": cpu_kernel_ops,
    "triton": triton_ops,
}


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def get_ops(backend: str = "auto", device: torch.device | str = "cpu") -> Ops:
    """The ops for ``backend``; ``auto`` picks the fastest one available for ``device``."""
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cpu":
            return _cpu_or_reference()
        backend = "triton" if device.type == "cuda" and triton_available() else "torch"
    try:
        make = _BACKENDS[backend]
    except KeyError:
        raise ValueError(
            f"unknown attention backend {backend!r}; available: auto, "
            + ", ".join(available_backends())
        ) from None
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"the cpu backend runs on CPU tensors, not {device.type}")
    if backend == "triton":
        from pagoda_kernels.triton_support import INTERPRET

        if device.type != "cuda" and not INTERPRET:
            raise ValueError(
                f"the triton attention backend needs a CUDA device, not {device.type}; "
                "set TRITON_INTERPRET=1 before triton is imported to run its kernels "
                "in Triton's interpreter (slow; for tests)"
            )
    return make()
