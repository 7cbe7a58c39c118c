"""The ranking primitives: the best candidates in the total order, the blocked argmax."""

from __future__ import annotations

import pytest
import torch

from tests.worker_svc.sampling.reference import reference_top
from worker_svc.sampling.ranking import argmax, top_candidates


@pytest.mark.parametrize("k", [1, 5, 64, 300, 2999])
def test_top_candidates_are_the_best_tokens_ties_by_lower_id(k):
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(6, 3000, generator=g) * 2).bfloat16().float()  # many exact ties
    x[1] = 1.0  # one value throughout
    x[2, 100:140] = 50.0  # a tie run across blocks
    x[3, -3:] = 60.0  # the best tokens in the short last block
    x[4, ::2] = float("-inf")
    x[5, 17] = -0.0
    x[5, 3] = 0.0
    values, ids = top_candidates(x, k)
    assert ids.tolist() == reference_top(x, k)
    assert torch.equal(values, x.gather(1, ids))


def test_argmax_is_torch_argmax_including_ties_and_ragged_widths():
    g = torch.Generator().manual_seed(0)
    for width in (7, 512, 513, 1000, 32_000, 49_157):
        x = torch.randn(5, width, generator=g).bfloat16().float()
        x[1] = 0.0
        x[2, width // 3] = x[2, width - 1] = 100.0
        x[3, -1] = 100.0
        assert torch.equal(argmax(x), x.argmax(-1)), width
