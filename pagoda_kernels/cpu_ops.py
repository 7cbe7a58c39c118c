"""Python faces of the CPU extension's operators (see cpu_build.py for how they are built).

Each function takes the torch reference's arguments and calls the operator of one
instruction-set variant, so tests can run every variant this CPU has side by side.
"""

from __future__ import annotations

from functools import cache

import torch

# Operators that write their outputs in place and return nothing: under torch.compile
# their fake kernel has nothing to compute.
_MUTATING = ("reshape_and_cache",)


@cache
def register_fakes(namespace: str) -> None:
    for name in _MUTATING:
        torch.library.register_fake(f"{namespace}::{name}")(lambda *args, **kwargs: None)


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
