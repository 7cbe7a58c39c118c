"""What every Triton kernel module shares: interpreter mode, launch counts, AOT variants.

The Triton kernels run in two places: on a CUDA device, compiled, and anywhere
under Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is first
imported), which is how they are tested on machines without a GPU. The
interpreter computes bfloat16 arithmetic wrongly, so kernels take an ``UPCAST``
constexpr that casts their loads to float32 first; it is on only in interpreter
mode. Each kernel module also lists its ``AotVariant``s: every kernel in every
dtype, compiled ahead of time for real GPU targets by the tests, which catches
what the interpreter lets through (bfloat16 paths, ``tl.dot`` shape rules).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

# Read once: triton itself reads it when first imported, so changing it later has
# no effect on how kernels run.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# How often each kernel was launched in this process. Tests read it to prove that a
# model really ran the Triton kernels, with no silent fallback to the torch ones.
LAUNCHES: Counter[str] = Counter()

_TL_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int64: "i64",
}

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The GPU architectures the kernels are compiled for in CI: Ampere (A100) and Hopper.
AOT_ARCHS = (80, 90)


def tl_type(dtype: torch.dtype) -> str:
    """The name Triton's signatures use for a scalar of ``dtype``."""
    return _TL_TYPES[dtype]


def ptr(dtype: torch.dtype) -> str:
    """The signature type of a pointer to ``dtype``."""
    return "*" + _TL_TYPES[dtype]


def check_device(*tensors: torch.Tensor) -> None:
    """Triton kernels run on CUDA tensors, or on CPU ones under the interpreter."""
    for t in tensors:
        if t.device.type != "cuda" and not INTERPRET:
            raise RuntimeError(
                f"the triton backend needs CUDA tensors (got {t.device}); on a CPU set "
                "TRITON_INTERPRET=1 before anything imports triton to run it in "
                "Triton's interpreter, or use the torch backend"
            )


@dataclass(frozen=True)
class AotVariant:
    """One kernel specialisation to compile ahead of time.

    ``signature`` maps every argument name to its Triton type (``*bf16``, ``i32``,
    ``fp32``, or ``constexpr``); ``constexprs`` gives the constexpr arguments' values.
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4

    def compile(self, arch: int) -> Any:
        """Compile for ``cuda`` at ``arch`` (80, 90, ...); raises on any compile error."""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        missing = set(self.fn.arg_names) - set(self.signature)
        if missing:
            raise ValueError(f"{self.name}: signature lacks {sorted(missing)}")
        src = ASTSource(fn=self.fn, signature=self.signature, constexprs=self.constexprs)
        return triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": self.num_warps},
        )
