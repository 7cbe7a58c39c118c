"""What the sampler reads of each row, and what it derives once from a row's parameters.

A request's ``SamplingParams`` are shared by its sequences and never change, so the
sampler turns them into a ``Plan`` (the temperature as a scale, the cuts as log2, the
bias as lists) while they are in use, not again on every step.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from pagoda.sampling_params import SamplingParams
from worker_svc.sampling.masses import LOG2E

# Temperatures below this are greedy, as in vLLM: dividing by them overflows float32, and
# the distribution is all but a point mass anyway.
GREEDY_TEMPERATURE = 1e-5
# The min-p cut of a row without min-p: below every finite logit, and finite, so that
# ``-inf - cut`` is -inf rather than NaN.
NO_CUT = torch.finfo(torch.float32).min


class SamplingRow(Protocol):
    """What the sampler reads of one sequence; the runner passes its own state objects.

    ``token_ids`` is expected to grow in place from step to step: the penalties keep a
    tensor copy of it per row object and convert only what was appended.
    """

    params: SamplingParams  # shared by the request's sequences, never mutated
    seed: int  # uint64: the request seed in two's complement
    sample_index: int  # which of the request's n samples
    token_ids: list[int]  # prompt + generated; the sampled token goes at len(token_ids)
    num_prompt_tokens: int


class Plan:
    """What the sampler needs of one SamplingParams, derived once while it is in use."""

    __slots__ = (
        "bias_ids",
        "bias_values",
        "frequency",
        "greedy",
        "log2_min_p",
        "logprobs",
        "min_ids",
        "min_tokens",
        "plain",
        "presence",
        "repetition",
        "scale",
        "top_k",
        "top_p",
    )

    def __init__(self, params: SamplingParams, vocab_size: int, eos: tuple[int, ...]):
        self.greedy = params.temperature < GREEDY_TEMPERATURE
        self.scale = 0.0 if self.greedy else LOG2E / params.temperature
        self.top_k = params.top_k if 0 < params.top_k < vocab_size else 0
        self.top_p = params.top_p if params.top_p < 1.0 else 1.0
        self.log2_min_p = math.log2(params.min_p) if params.min_p > 0.0 else NO_CUT
        self.repetition = params.repetition_penalty
        self.frequency = params.frequency_penalty
        self.presence = params.presence_penalty
        bias = [(t, v) for t, v in params.logit_bias.items() if t < vocab_size and v != 0.0]
        self.bias_ids = [t for t, _ in bias]
        self.bias_values = [v for _, v in bias]
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos))
        self.min_ids = sorted(t for t in stops if t < vocab_size)
        self.min_tokens = params.min_tokens if self.min_ids else 0
        self.logprobs = params.logprobs
        self.plain = (
            self.greedy
            and not bias
            and self.min_tokens == 0
            and self.repetition == 1.0
            and self.frequency == 0.0
            and self.presence == 0.0
            and self.logprobs is None
        )

    @property
    def nucleus(self) -> bool:
        """top-p without top-k: the nucleus is a share of the whole row's mass."""
        return self.top_p < 1.0 and not self.top_k

    @property
    def penalized(self) -> bool:
        return self.repetition != 1.0 or self.frequency != 0.0 or self.presence != 0.0
