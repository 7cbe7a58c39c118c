"""Counter-based randomness: one uniform number per row, a pure function of the row.

A token drawn from (seed, sample index, position) alone does not depend on the other
rows of the batch, and a sequence resumed after preemption or on another machine draws
the same numbers (docs/sampling.md, "Randomness").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker_svc.sampling.plan import SamplingRow
from worker_svc.sampling.tensors import ints

# SplitMix64 constants, as two's-complement int64 for torch.
_MASK64 = (1 << 64) - 1


def _as_int64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _as_int64(0x9E3779B97F4A7C15)
_MIX1 = _as_int64(0xBF58476D1CE4E5B9)
_MIX2 = _as_int64(0x94D049BB133111EB)


def _srl(z: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts int64 arithmetically; uint64 has no >>)."""
    return (z >> shift) & ((1 << (64 - shift)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function, mod 2**64 in int64 (torch's int64 arithmetic wraps)."""
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    return z ^ _srl(z, 31)


def counter_uniforms(
    seeds: torch.Tensor, sample_indices: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """One uniform float64 in [0, 1) per (seed, sample index, position), batched.

    ``seeds`` are int64 tensors holding the uint64 seed in two's complement. With all
    arithmetic mod 2**64, ``mix64`` SplitMix64's output function and ``G`` its increment
    0x9E3779B97F4A7C15::

        key  = mix64(seed + G * (sample_index + 1))
        bits = mix64(key + G * (position + 1))
        u    = (bits >> 11) * 2**-53

    That is: the (position + 1)-th output of a SplitMix64 generator seeded with the
    (sample_index + 1)-th output of one seeded with the request seed. A pure function of
    its inputs, so any batch, device or process draws the same numbers.
    """
    key = _mix64(seeds + (sample_indices + 1) * _GOLDEN)
    bits = _mix64(key + (positions + 1) * _GOLDEN)
    return _srl(bits, 11).to(torch.float64) * (2.0**-53)


def row_uniforms(rows: Sequence[SamplingRow], device: torch.device) -> torch.Tensor:
    """The uniform number of each row's next token (the one at ``len(token_ids)``)."""
    seeds = [_as_int64(row.seed) for row in rows]
    indices = [row.sample_index for row in rows]
    positions = [len(row.token_ids) for row in rows]
    return counter_uniforms(ints(seeds, device), ints(indices, device), ints(positions, device))
