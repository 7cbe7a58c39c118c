"""Putting checkpoint tensors into a model's parameters, with the errors users need.

Every model maps Hugging Face names onto its own modules the same way: optionally
renamed, possibly fused (q/k/v into one projection, gate/up into one), each
parameter filled through its ``weight_loader`` so tensor-parallel slicing stays in
the layers. Loading is tensor by tensor, so no second copy of the model is held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Fused:
    """Checkpoint tensors named ``...{part}...`` go into ``...{into}...`` as shard ``shard``."""

    part: str
    into: str
    shard: object


@dataclass
class WeightMap:
    """How one architecture's checkpoint names become parameter names."""

    fused: list[Fused] = field(default_factory=list)
    # Returns the parameter name for a checkpoint name, or None for a known tensor to skip.
    rename: Callable[[str], str | None] = lambda name: name
    # Checkpoint tensors that are stored transposed (GPT-2's Conv1D), by parameter name.
    transposed: Callable[[str], bool] = lambda name: False


def load_weights(
    model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], mapping: WeightMap
) -> None:
    """Fill every parameter of ``model``; raise ValueError on unknown, missing or misshapen ones."""
    params = dict(model.named_parameters())
    expected = {name: _shards_of(name, mapping) for name in params}
    seen: dict[str, set] = {name: set() for name in params}
    unexpected: list[str] = []
    for ckpt_name, tensor in weights:
        name = mapping.rename(ckpt_name)
        if name is None:
            continue
        shard = None
        for fused in mapping.fused:
            if fused.part in name:
                name, shard = name.replace(fused.part, fused.into), fused.shard
                break
        param = params.get(name)
        if param is None:
            unexpected.append(ckpt_name)
            continue
        if mapping.transposed(name) and tensor.dim() == 2:
            tensor = tensor.t()
        loader = getattr(param, "weight_loader", None) or _module_loader(model, name)
        try:
            with torch.no_grad():
                loader(param, tensor.to(param.dtype), shard)
        except ValueError as e:
            raise ValueError(f"tensor {ckpt_name!r}: {e}") from None
        seen[name].add(shard)
    missing = sorted(
        f"{name}" + (f" ({', '.join(map(str, want - seen[name]))})" if want != {None} else "")
        for name, want in expected.items()
        if not want <= seen[name]
    )
    if unexpected or missing:
        parts = []
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(sorted(unexpected)[:20])}")
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:20])}")
        raise ValueError("checkpoint does not match the model: " + "; ".join(parts))


def _shards_of(name: str, mapping: WeightMap) -> set:
    shards = {f.shard for f in mapping.fused if f.into in name}
    return shards or {None}


def _module_loader(model: nn.Module, name: str) -> Callable:
    """The weight_loader of the module that owns parameter ``name``."""
    owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    loader = getattr(owner, "weight_loader", None)
    if loader is None:
        return _plain_copy
    return loader


def _plain_copy(param: torch.Tensor, loaded: torch.Tensor, shard=None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} != {tuple(param.shape)}")
    param.data.copy_(loaded)
