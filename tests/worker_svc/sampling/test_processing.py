"""Bias, min_tokens and penalties against their definitions (and transformers')."""

from __future__ import annotations

import random

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from pagoda.sampling_params import SamplingParams
from tests.worker_svc.sampling.reference import (
    ALPHA,
    EOS,
    Row,
    chi_square_p,
    reference_probs,
    reference_processed,
    small_logits,
)
from worker_svc.sampling import Sampler


def test_penalties_and_bias_shape_the_distribution():
    logits = small_logits(seed=5)
    history = [3, 3, 3, 11, 17, 17, 30, 4, 4, 40]
    params = SamplingParams(
        temperature=1.0,
        repetition_penalty=1.7,
        frequency_penalty=0.4,
        presence_penalty=0.6,
        logit_bias={3: 1.5, 20: -3.0},
    )
    want = reference_probs(reference_processed(logits, history, 4, params, 48), 1.0)
    rng = random.Random(9)
    rows = [
        Row(params, rng.getrandbits(64), rng.randrange(4), list(history), 4) for _ in range(20_000)
    ]
    tokens = torch.tensor(Sampler(48, EOS)(logits.expand(len(rows), -1), rows).token_ids)
    counts = torch.bincount(tokens, minlength=48)
    assert chi_square_p(counts, want) > ALPHA
    assert chi_square_p(counts, reference_probs(logits, 1.0)) < 1e-9  # the penalties matter


def test_penalties_and_bias_match_their_definitions():
    vocab = 300
    rng = random.Random(4)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, vocab + 20, generator=g) * 3
    logits[:, vocab:] = 1000.0  # padding columns are not tokens
    original = logits.clone()
    params = [
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=0.7),
        SamplingParams(presence_penalty=-1.5, frequency_penalty=-0.3),
        SamplingParams(logit_bias={0: 100.0, 5: -7.5, vocab + 3: 9.0}, repetition_penalty=1.2),
        SamplingParams(temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0),
        SamplingParams(),
    ]
    rows = []
    for p in params:
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 50))]
        output = [rng.choice(prompt + [rng.randrange(vocab)]) for _ in range(rng.randrange(0, 30))]
        rows.append(Row(p, token_ids=prompt + output, num_prompt_tokens=len(prompt)))
    sampler = Sampler(vocab, EOS)
    got = sampler.processed_logits(logits, rows)
    assert got.shape == (6, vocab) and got.dtype == torch.float32
    for i, row in enumerate(rows):
        want = reference_processed(
            logits[i, :vocab], row.token_ids, row.num_prompt_tokens, row.params, vocab
        )
        torch.testing.assert_close(got[i].double(), want, rtol=1e-6, atol=1e-5)
    assert torch.equal(logits, original), "the caller's logits were changed"
    # The cached token histories follow the rows as they grow.
    for row in rows:
        row.token_ids.append(rng.randrange(vocab))
    got = sampler.processed_logits(logits, rows)
    for i, row in enumerate(rows):
        want = reference_processed(
            logits[i, :vocab], row.token_ids, row.num_prompt_tokens, row.params, vocab
        )
        torch.testing.assert_close(got[i].double(), want, rtol=1e-6, atol=1e-5)
    # A list replaced (a resumed sequence) or rewritten in place is read again.
    rows[0].token_ids = [rng.randrange(vocab) for _ in range(60)]
    old = rows[1].token_ids
    rewritten = [rng.randrange(vocab) for _ in range(len(old) + 1)]
    rewritten[len(old) - 1] = (old[-1] + 1) % vocab
    old[:] = rewritten
    got = sampler.processed_logits(logits, rows)
    for i, row in enumerate(rows):
        want = reference_processed(
            logits[i, :vocab], row.token_ids, row.num_prompt_tokens, row.params, vocab
        )
        torch.testing.assert_close(got[i].double(), want, rtol=1e-6, atol=1e-5)
    # Greedy picks the argmax of the processed logits.
    assert sampler(logits, rows).token_ids[4] == int(got[4].argmax())


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    vocab = 500
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, vocab, generator=g) * 4
    token_ids = torch.randint(0, vocab, (120,), generator=g).tolist()
    row = Row(SamplingParams(repetition_penalty=penalty), token_ids=token_ids, num_prompt_tokens=80)
    got = Sampler(vocab, EOS).processed_logits(logits, [row])
    hf = RepetitionPenaltyLogitsProcessor(penalty=penalty)(
        torch.tensor([token_ids]), logits.clone()
    )
    assert torch.equal(got, hf)


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    vocab = 64
    logits = torch.zeros(1, vocab)
    logits[0, EOS] = 8.0
    logits[0, 40] = 7.5  # a stop id
    logits[0, 12] = 1.0
    sampler = Sampler(vocab, EOS)
    rng = random.Random(0)
    for temperature in (0.0, 1.0):
        for ignore_eos in (False, True):
            params = SamplingParams(
                temperature=temperature, min_tokens=3, stop_token_ids=[40], ignore_eos=ignore_eos
            )
            for generated in range(5):
                rows = [
                    Row(
                        params,
                        seed=rng.getrandbits(64),
                        token_ids=[1] * (4 + generated),
                        num_prompt_tokens=4,
                    )
                    for _ in range(400)
                ]
                tokens = set(sampler(logits.expand(len(rows), -1), rows).token_ids)
                masked = set() if generated >= 3 else {40} | (set() if ignore_eos else set(EOS))
                assert not tokens & masked, (temperature, ignore_eos, generated)
                if temperature == 0.0:
                    assert tokens == ({12} if masked == {40} | set(EOS) else {2})
