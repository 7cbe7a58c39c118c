"""Draws follow the filtered softmax, whatever the batch around a row, the rounds of
candidates it takes, or the sampler's state."""

from __future__ import annotations

import math
import random

import pytest
import torch

from pagoda.sampling_params import SamplingParams
from tests.worker_svc.sampling.reference import (
    ALPHA,
    EOS,
    Row,
    chi2_sf,
    chi_square_p,
    draw_many,
    reference_probs,
    small_logits,
)
from worker_svc.sampling import Sampler, draws, ranking


def test_chi2_sf_matches_closed_forms():
    for x in (0.1, 1.0, 3.84, 10.0, 40.0, 150.0):
        # odd dof 1: erfc(sqrt(x / 2)); even dof 2m: exp(-x/2) * sum_{i<m} (x/2)^i / i!
        assert chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9, abs=1e-300)
        for m in (1, 2, 5, 20, 60):
            want = math.exp(-x / 2) * sum((x / 2) ** i / math.factorial(i) for i in range(m))
            assert chi2_sf(x, 2 * m) == pytest.approx(want, rel=1e-9, abs=1e-300)
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)


STAT_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.5),
    dict(temperature=2.0, top_k=10),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=1.3, min_p=0.05),
    dict(temperature=1.0, top_k=12, top_p=0.9),
    dict(temperature=0.9, min_p=0.02, top_p=0.85),
    dict(temperature=0.8, top_k=20, min_p=0.1, top_p=0.95),
    dict(temperature=1.0, top_k=1),
    dict(temperature=1.0, top_k=30, min_p=0.1),
]


@pytest.mark.parametrize(
    "case", STAT_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
def test_draws_follow_the_filtered_softmax(case):
    logits = small_logits()
    want = reference_probs(
        logits,
        case["temperature"],
        case.get("top_k", 0),
        case.get("top_p", 1.0),
        case.get("min_p", 0.0),
    )
    sampler = Sampler(logits.shape[0], EOS)
    tokens = draw_many(sampler, logits[None], SamplingParams(**case), 20_000)
    counts = torch.bincount(tokens, minlength=logits.shape[0])
    assert counts[want == 0].sum() == 0, "a filtered-out token was drawn"
    assert chi_square_p(counts, want) > ALPHA
    if (want > 0).sum() > 1:  # the test tells a temperature 20% off
        wrong = reference_probs(
            logits, case["temperature"] * 1.2, case.get("top_k", 0), case.get("top_p", 1.0)
        )
        assert chi_square_p(counts, wrong) < 1e-6


def test_draws_over_a_large_vocabulary_follow_the_filtered_softmax():
    """Large rows take the blocked paths: per-block masses, candidate blocks, a nucleus
    wider than the first candidates (a second round), and bf16 logits."""
    vocab = 5000
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(vocab, generator=g) - 4.0
    heads = torch.randperm(vocab, generator=g)[:150]
    logits[heads] = torch.randn(150, generator=g) * 0.4 + 3.0
    logits = logits.bfloat16().float()  # the bf16 grid, with its ties
    sampler = Sampler(vocab, EOS)
    for i, case in enumerate(
        [
            dict(temperature=1.0),
            dict(temperature=0.7, min_p=0.05),
            dict(top_k=40),
            dict(top_p=0.7),
            dict(top_p=0.9, min_p=0.01),
        ]
    ):
        want = reference_probs(
            logits,
            case.get("temperature", 1.0),
            case.get("top_k", 0),
            case.get("top_p", 1.0),
            case.get("min_p", 0.0),
        )
        tokens = draw_many(
            sampler, logits[None].bfloat16(), SamplingParams(**case), 4000, chunk=2000, salt=i
        )
        counts = torch.bincount(tokens, minlength=vocab)
        assert counts[want == 0].sum() == 0, case
        assert chi_square_p(counts, want) > ALPHA, case


# ---------------------------------------------------------------- batch independence


def varied_rows(vocab: int, rng: random.Random) -> list[Row]:
    """Rows of every kind, to surround the row under test."""
    kinds = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.2),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=1.0, top_k=1000),
        SamplingParams(temperature=1.2, top_p=0.5),
        SamplingParams(temperature=1.0, min_p=0.1, top_p=0.9),
        SamplingParams(frequency_penalty=1.0, presence_penalty=-0.5, logit_bias={1: 5.0}),
        SamplingParams(min_tokens=4, stop_token_ids=[3]),
    ]
    return [
        Row(
            p,
            seed=rng.getrandbits(64),
            sample_index=rng.randrange(3),
            token_ids=[rng.randrange(vocab) for _ in range(rng.randrange(2, 30))],
            num_prompt_tokens=1,
        )
        for p in kinds
    ]


SUBJECTS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6, min_p=0.02),
    SamplingParams(temperature=1.0, top_k=40),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=1.5, top_p=0.95, min_p=0.001),
    SamplingParams(temperature=1.0, top_k=50, top_p=0.8, repetition_penalty=1.3),
    SamplingParams(temperature=1.0, frequency_penalty=0.5, logit_bias={10: 2.0}, logprobs=2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_token_does_not_depend_on_the_rest_of_the_batch(dtype):
    vocab = 12_000
    rng = random.Random(8)
    g = torch.Generator().manual_seed(8)
    for params in SUBJECTS:
        for _ in range(2):
            subject = Row(
                params,
                seed=rng.getrandbits(64),
                sample_index=rng.randrange(4),
                token_ids=[rng.randrange(vocab) for _ in range(20)],
                num_prompt_tokens=10,
            )
            row_logits = (torch.randn(1, vocab, generator=g) * 2.5).to(dtype)
            alone = Sampler(vocab, EOS)(row_logits, [subject])
            others = varied_rows(vocab, rng)
            other_logits = (torch.randn(len(others), vocab, generator=g) * 2.5).to(dtype)
            batch = [subject] + others
            logits = torch.cat([row_logits, other_logits])
            mixes = [
                (list(range(len(batch))), 0),
                (list(range(len(batch)))[::-1], len(batch) - 1),
                ([1, 2, 0, 4], 2),
                ([5, 0, 0, 7], 1),  # the row twice
            ]
            for order, at in mixes:
                out = Sampler(vocab, EOS)(logits[order], [batch[i] for i in order])
                assert out.token_ids[at] == alone.token_ids[0], (params, order)
                assert out.logprobs[at] == alone.logprobs[0]


def test_candidate_rounds_do_not_change_the_result(monkeypatch):
    """Fewer first candidates (more rounds) or other block widths: the same tokens."""
    vocab = 9000
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(64, vocab, generator=g) * torch.linspace(0.3, 4.0, 64)[:, None]
    rng = random.Random(2)
    params = [
        SamplingParams(top_p=0.9),
        SamplingParams(top_p=0.6, min_p=0.01),
        SamplingParams(top_k=30, top_p=0.95),
        SamplingParams(top_k=7),
    ]
    rows = [Row(params[i % 4], seed=rng.getrandbits(64)) for i in range(64)]
    want = Sampler(vocab, EOS)(logits, rows).token_ids
    for first, block in [(4, 32), (16, 8), (2048, 32), (64, 64)]:
        monkeypatch.setattr(draws, "_FIRST_CANDIDATES", first)
        monkeypatch.setattr(ranking, "_CANDIDATE_BLOCK", block)
        assert Sampler(vocab, EOS)(logits, rows).token_ids == want, (first, block)


def test_a_fresh_sampler_draws_the_same():
    """Resuming elsewhere: no state of the sampler changes a draw."""
    vocab = 1000
    logits = torch.randn(4, vocab)
    rows = [Row(SamplingParams(top_p=0.9), seed=99, sample_index=i) for i in range(4)]
    first = Sampler(vocab, EOS)
    assert first(logits, rows).token_ids == first(logits, rows).token_ids
    assert Sampler(vocab, EOS)(logits, rows).token_ids == first(logits, rows).token_ids
