"""The sampler of a step: one token (and, where asked, its logprobs) per row of logits.

It prepares each row's plan, applies the logits processing, then takes the greedy rows'
argmax and draws the others, and last computes the logprobs the rows asked for; each
stage works on all its rows at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pagoda.sampling_params import SamplingParams
from pagoda.v1 import common_pb2
from worker_svc.sampling.draws import sample
from worker_svc.sampling.logprobs import prompt_logprobs, token_logprobs
from worker_svc.sampling.plan import Plan, SamplingRow
from worker_svc.sampling.processing import LogitsProcessor
from worker_svc.sampling.ranking import argmax
from worker_svc.sampling.tensors import Workspace, ints


@dataclass(slots=True)
class SamplerOutput:
    """One entry per row, in the order of the rows."""

    token_ids: list[int]
    logprobs: list[common_pb2.TokenLogprobs | None]


class Sampler:
    """Samples one token per row of a step's logits, each row with its own parameters."""

    def __init__(
        self,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        raw_argmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """``raw_argmax``: a kernel's argmax over logits in their own dtype (e.g. the CPU
        extension's), for steps whose rows are all plain greedy ones."""
        self.vocab_size = int(vocab_size)
        self._raw_argmax = raw_argmax
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        # Keyed by id() with the object held, so an id is never reused while cached;
        # entries not seen in a step are dropped.
        self._plans: dict[int, tuple[SamplingParams, Plan]] = {}
        self._work = Workspace()
        self._process = LogitsProcessor(self._work)

    # ------------------------------------------------------------------------- public

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        raw, plans = self._prepare(logits, rows)
        if all(plan.plain for plan in plans):  # greedy, nothing to apply: one argmax
            if self._raw_argmax is not None:
                tokens = self._raw_argmax(raw)
            else:
                tokens = argmax(self._work.float32("x", raw))
            return SamplerOutput(tokens.tolist(), [None] * len(rows))
        tokens = self._tokens(self._process(raw, rows, plans), rows, plans)
        return SamplerOutput(tokens.tolist(), self._logprobs(raw, tokens, plans))

    @torch.no_grad()
    def processed_logits(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """float32 [R, vocab_size]: the logits after bias, min_tokens and penalties.

        Greedy rows take the argmax of these; sampled rows draw from the softmax of these
        over their temperature, after min-p, top-k and top-p. Always a new tensor.
        """
        raw, plans = self._prepare(logits, rows)
        return self._process(raw, rows, plans, fresh=True)

    def prompt_logprobs(
        self, logits: torch.Tensor, target_ids: torch.Tensor, num_top: int
    ) -> list[common_pb2.TokenLogprobs]:
        """:func:`prompt_logprobs` with this sampler's vocabulary size."""
        return prompt_logprobs(logits, target_ids, num_top, vocab_size=self.vocab_size)

    # ------------------------------------------------------------------------ the step

    def _prepare(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow]
    ) -> tuple[torch.Tensor, list[Plan]]:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        if logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns < {self.vocab_size}")
        raw = logits if logits.shape[1] == self.vocab_size else logits[:, : self.vocab_size]
        cache, plans, seen = self._plans, [], {}
        for row in rows:
            params = row.params
            entry = cache.get(id(params))
            if entry is None or entry[0] is not params:
                entry = (params, Plan(params, self.vocab_size, self.eos_token_ids))
            seen[id(params)] = entry
            plans.append(entry[1])
        self._plans = seen
        return raw, plans

    def _tokens(
        self, x: torch.Tensor, rows: Sequence[SamplingRow], plans: list[Plan]
    ) -> torch.Tensor:
        """The greedy rows' argmax and the other rows' draws, from processed logits."""
        work, device = self._work, x.device
        greedy = [i for i, plan in enumerate(plans) if plan.greedy]
        sampled = [i for i, plan in enumerate(plans) if not plan.greedy]
        if not sampled:
            return argmax(x)
        if not greedy:
            return sample(x, rows, plans, work)
        tokens = torch.empty(len(rows), dtype=torch.int64, device=device)
        tokens[ints(greedy, device)] = argmax(work.rows("greedy", x, greedy))
        tokens[ints(sampled, device)] = sample(
            work.rows("sampled", x, sampled),
            [rows[i] for i in sampled],
            [plans[i] for i in sampled],
            work,
        )
        return tokens

    def _logprobs(
        self, raw: torch.Tensor, tokens: torch.Tensor, plans: list[Plan]
    ) -> list[common_pb2.TokenLogprobs | None]:
        """The logprobs of the rows that asked, from the raw logits; None for the others."""
        logprobs: list[common_pb2.TokenLogprobs | None] = [None] * len(plans)
        asked = [i for i, plan in enumerate(plans) if plan.logprobs is not None]
        if asked:
            entries = token_logprobs(
                self._work.rows("asked", raw, asked),
                tokens[ints(asked, raw.device)],
                [plans[i].logprobs for i in asked],
                self._work,
            )
            for i, entry in zip(asked, entries, strict=True):
                logprobs[i] = entry
        return logprobs
