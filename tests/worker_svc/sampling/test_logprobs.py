"""Logprobs of sampled and prompt tokens against log_softmax of the raw logits."""

from __future__ import annotations

import pytest
import torch

from pagoda.sampling_params import SamplingParams
from tests.worker_svc.sampling.reference import EOS, Row, reference_top
from worker_svc.sampling import Sampler, prompt_logprobs


def check_entry(entry, raw_row: torch.Tensor, token: int, num_top: int):
    lp = torch.log_softmax(raw_row.double(), -1)
    assert entry.token_id == token
    assert entry.logprob == pytest.approx(float(lp[token]), abs=2e-5)
    assert entry.rank == 1 + int((raw_row.float() > raw_row.float()[token]).sum())
    best = reference_top(raw_row.float()[None], num_top)[0]
    assert list(entry.top_token_ids) == best
    for got, t in zip(entry.top_logprobs, best, strict=True):
        assert got == pytest.approx(float(lp[t]), abs=2e-5)


def test_logprobs_come_from_the_raw_logits():
    vocab = 5000
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(5, vocab + 8, generator=g) * 3).bfloat16()
    rows = [
        Row(SamplingParams(temperature=0.0, logprobs=0)),
        Row(SamplingParams(temperature=0.7, top_k=20, logprobs=5), seed=1),
        Row(SamplingParams(temperature=1.0, repetition_penalty=2.0, logprobs=20), seed=2),
        Row(SamplingParams(temperature=1.0), seed=3),
        Row(SamplingParams(temperature=1.0, top_p=0.5, logit_bias={4: 9.0}, logprobs=1), seed=4),
    ]
    rows[2].token_ids = list(range(0, 5000, 3))
    out = Sampler(vocab, EOS)(logits, rows)
    assert out.logprobs[3] is None
    for i, n in [(0, 0), (1, 5), (2, 20), (4, 1)]:
        check_entry(out.logprobs[i], logits[i, :vocab], out.token_ids[i], n)
    assert out.logprobs[0].rank == 1 and not out.logprobs[0].top_token_ids


def test_prompt_logprobs_match_log_softmax():
    vocab = 700
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(300, vocab + 4, generator=g) * 2  # more rows than one chunk
    targets = torch.randint(0, vocab, (300,), generator=g)
    for num_top in (0, 4):
        entries = prompt_logprobs(logits, targets, num_top, vocab_size=vocab)
        assert len(entries) == 300
        for i in (0, 1, 255, 256, 299):
            check_entry(entries[i], logits[i, :vocab], int(targets[i]), num_top)
    assert Sampler(vocab, EOS).prompt_logprobs(logits, targets, 2) == prompt_logprobs(
        logits[:, :vocab], targets, 2
    )
