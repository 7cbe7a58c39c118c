"""Rotary position embeddings: the cos/sin table, including rope scaling.

Reads both ways Hugging Face configs spell rope settings: ``rope_parameters``
(transformers 5: ``rope_type``, ``rope_theta`` and the scaling keys in one dict, no
top-level ``rope_theta``) and the older top-level ``rope_theta`` plus ``rope_scaling``.
Falling back to theta 10000 when the key is elsewhere would be silently wrong for
most recent models, so a config with rope settings in neither place uses the
architecture's documented default only when the caller passes one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pagoda_kernels.dispatch import Ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_settings(config: dict[str, Any], default_theta: float = 10000.0) -> tuple[float, dict]:
    """(theta, scaling) from a config dict; scaling is ``{}`` for plain rope."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", config.get("rope_theta", default_theta))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = config.get("rope_theta", default_theta)
        scaling = dict(config.get("rope_scaling") or {})
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope scaling {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    scaling.pop("type", None)
    return float(theta), ({"rope_type": rope_type, **scaling} if rope_type != "default" else {})


def inverse_frequencies(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """The rotation frequency of each pair of dimensions, after scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by ``factor``, short ones kept, a ramp between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    ramp = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - ramp) * slowed / factor + ramp * slowed
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, slowed)


class RotaryEmbedding(nn.Module):
    """Holds the float32 cos/sin table for every position up to ``max_position``."""

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        theta: float,
        scaling: dict,
        ops: Ops,
        is_neox: bool = True,
    ):
        super().__init__()
        self.ops = ops
        self.is_neox = is_neox
        inv_freq = inverse_frequencies(head_dim, theta, scaling)
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.rotary_embedding(positions, q, k, self.cos_sin_cache, self.is_neox)
