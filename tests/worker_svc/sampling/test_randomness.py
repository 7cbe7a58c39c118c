"""The counter-based uniforms are SplitMix64 as documented, uniform and independent."""

from __future__ import annotations

import random

import torch

from pagoda.sampling_params import SamplingParams
from tests.worker_svc.sampling.reference import ALPHA, Row, chi_square_p
from worker_svc.sampling import Sampler, counter_uniforms

_G, _M1, _M2, _MASK = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 2**64 - 1


def splitmix64(state: int):
    """The reference SplitMix64 generator, in Python integers."""
    while True:
        state = (state + _G) & _MASK
        z = state
        z = ((z ^ (z >> 30)) * _M1) & _MASK
        z = ((z ^ (z >> 27)) * _M2) & _MASK
        yield z ^ (z >> 31)


def reference_uniform(seed: int, sample_index: int, position: int) -> float:
    keys = splitmix64(seed & _MASK)
    for _ in range(sample_index + 1):
        key = next(keys)
    outputs = splitmix64(key)
    for _ in range(position + 1):
        bits = next(outputs)
    return (bits >> 11) * 2.0**-53


def test_reference_generator_is_splitmix64():
    outputs = splitmix64(0)
    assert [next(outputs) for _ in range(3)] == [
        0xE220A8397B1DCDAF,
        0x6E789E6AA1B965F4,
        0x06C45D188009454F,
    ]


def test_counter_uniforms_are_the_documented_function():
    rng = random.Random(5)
    cases = [(0, 0, 0), (2**64 - 1, 3, 17), (2**63, 0, 5), (12345, 7, 0)]
    cases += [(rng.getrandbits(64), rng.randrange(8), rng.randrange(60)) for _ in range(40)]
    signed = [s - 2**64 if s >= 2**63 else s for s, _, _ in cases]
    got = counter_uniforms(
        torch.tensor(signed),
        torch.tensor([i for _, i, _ in cases]),
        torch.tensor([p for _, _, p in cases]),
    )
    assert got.dtype == torch.float64
    assert got.tolist() == [reference_uniform(*c) for c in cases]


def test_uniforms_are_uniform_and_independent_across_index_position_and_seed():
    n = 20_000
    seeds = torch.arange(n, dtype=torch.int64) * 7919 + 11
    zero = torch.zeros(n, dtype=torch.int64)
    base = counter_uniforms(seeds, zero, zero + 5)
    others = {
        "sample index": counter_uniforms(seeds, zero + 1, zero + 5),
        "position": counter_uniforms(seeds, zero, zero + 6),
        "seed": counter_uniforms(seeds + 1, zero, zero + 5),
    }
    bins = 20
    flat = torch.full((bins,), 1.0 / bins)
    assert chi_square_p(torch.bincount((base * bins).long(), minlength=bins), flat) > ALPHA
    for name, u in others.items():
        cells = (base * 10).long() * 10 + (u * 10).long()  # a 10 x 10 joint histogram
        counts = torch.bincount(cells, minlength=100)
        assert chi_square_p(counts, torch.full((100,), 0.01)) > ALPHA, name


def test_token_draws_are_independent_across_samples_and_positions():
    """Two tokens of equal probability: the pair (sample 0, sample 1) and the pair
    (position p, p + 1) of the same seed are uniform over the four outcomes."""
    sampler = Sampler(2, [])
    params = SamplingParams(temperature=1.0)
    logits = torch.zeros(1, 2)
    n = 8000
    rows = lambda index, length: [  # noqa: E731
        Row(params, seed=s * 104729, sample_index=index, token_ids=[1] * length) for s in range(n)
    ]
    first = torch.tensor(sampler(logits.expand(n, -1), rows(0, 3)).token_ids)
    sibling = torch.tensor(sampler(logits.expand(n, -1), rows(1, 3)).token_ids)
    later = torch.tensor(sampler(logits.expand(n, -1), rows(0, 4)).token_ids)
    for other in (sibling, later):
        counts = torch.bincount(first * 2 + other, minlength=4)
        assert chi_square_p(counts, torch.full((4,), 0.25)) > ALPHA
