"""The sampler's step as a whole: greedy rows, rows with nothing left, bad shapes."""

from __future__ import annotations

import pytest
import torch

from pagoda.sampling_params import SamplingParams
from pagoda_kernels.dispatch import get_ops
from tests.worker_svc.sampling.reference import EOS, Row
from worker_svc.sampling import Sampler


def test_greedy_is_the_argmax_of_the_real_vocabulary():
    vocab = 32_000
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(8, vocab + 128, generator=g) * 3
    logits[:, vocab:] = 1e4  # padded LM head columns
    logits[3, 10] = logits[3, 20] = 50.0  # a tie: the lower id wins
    rows = [Row(SamplingParams(temperature=0.0)) for _ in range(8)]
    rows[5] = Row(SamplingParams(temperature=1e-6))  # below GREEDY_TEMPERATURE
    want = logits[:, :vocab].argmax(-1).tolist()
    cpu = get_ops("cpu")
    for sampler in (Sampler(vocab, EOS), Sampler(vocab, EOS, cpu.argmax)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            lg = logits.to(dtype)
            assert sampler(lg, rows).token_ids == lg[:, :vocab].float().argmax(-1).tolist()
        assert sampler(logits, rows).token_ids == want
    assert want[3] == 10
    # The same greedy rows in a batch that also samples (the general path).
    mixed = rows + [Row(SamplingParams(temperature=1.0, top_k=3))]
    extra = torch.cat([logits, logits[:1]])
    assert sampler(extra, mixed).token_ids[:8] == want


def test_a_row_with_every_token_masked_still_gets_a_token():
    """min_tokens over a vocabulary of stop tokens only: no error, whatever the path."""
    sampler = Sampler(3, [0, 1, 2])
    kinds = [
        {},
        dict(top_k=2),
        dict(top_p=0.5),
        dict(min_p=0.5, top_p=0.5),
        dict(temperature=0.0),
        dict(logprobs=2),
    ]
    rows = [Row(SamplingParams(min_tokens=5, **kw), seed=i) for i, kw in enumerate(kinds)]
    out = sampler(torch.zeros(len(rows), 3), rows)
    assert all(0 <= t < 3 for t in out.token_ids)


def test_an_empty_step_and_bad_shapes():
    sampler = Sampler(10, EOS)
    assert sampler(torch.zeros(0, 10), []).token_ids == []
    with pytest.raises(ValueError):
        sampler(torch.zeros(2, 10), [Row(SamplingParams())])
    with pytest.raises(ValueError):
        sampler(torch.zeros(1, 9), [Row(SamplingParams())])
