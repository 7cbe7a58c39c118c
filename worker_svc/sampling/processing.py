"""The logits after, in vLLM's order: logit_bias, min_tokens masking, repetition penalty,
frequency and presence penalties.

One indexed op per kind for the whole batch, whatever the mix of rows: the rows' edits
are gathered into flat indices first, and no [rows, vocab] mask is ever built.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker_svc.sampling.masses import NEG_INF
from worker_svc.sampling.plan import Plan, SamplingRow
from worker_svc.sampling.tensors import Workspace, floats, ints


class History:
    """A row's token ids as a tensor, extended as the sequence grows (penalties read it).

    Converting a long prompt from a Python list every step would cost more than the
    penalty itself; a row's list only grows, so only its new tail is converted. A list
    that was replaced, shortened or rewritten is converted again from the start.
    """

    __slots__ = ("ids", "last", "row", "tokens")

    def __init__(self, row: SamplingRow):
        self.row = row
        self.tokens = row.token_ids
        self.ids = torch.empty(0, dtype=torch.int64)
        self.last = -1

    def update(self) -> torch.Tensor:
        tokens, have = self.row.token_ids, self.ids.shape[0]
        if (
            tokens is not self.tokens
            or len(tokens) < have
            or (have and tokens[have - 1] != self.last)
        ):
            self.tokens, self.ids, have = tokens, self.ids[:0], 0
        if len(tokens) > have:
            self.ids = torch.cat([self.ids, ints(tokens[have:], self.ids.device)])
            self.last = tokens[-1]
        return self.ids


class LogitsProcessor:
    """Applies the rows' bias, min_tokens and penalties; keeps their histories meanwhile.

    Histories are keyed by id() with the row held, so an id is never reused while
    cached; rows not penalized in a step are dropped.
    """

    def __init__(self, work: Workspace) -> None:
        self._work = work
        self._histories: dict[int, History] = {}

    def __call__(
        self,
        raw: torch.Tensor,
        rows: Sequence[SamplingRow],
        plans: list[Plan],
        fresh: bool = False,
    ) -> torch.Tensor:
        """float32 logits after bias, min_tokens and penalties. ``raw`` itself when there
        is nothing to do, unless ``fresh`` asks for a new tensor."""
        device = raw.device
        bias_rows: list[int] = []
        bias_ids: list[int] = []
        bias_values: list[float] = []
        mask_rows: list[int] = []
        mask_ids: list[int] = []
        penalized: list[int] = []
        for i, (row, plan) in enumerate(zip(rows, plans, strict=True)):
            if plan.bias_ids:
                bias_rows += [i] * len(plan.bias_ids)
                bias_ids += plan.bias_ids
                bias_values += plan.bias_values
            if plan.min_tokens and len(row.token_ids) - row.num_prompt_tokens < plan.min_tokens:
                mask_rows += [i] * len(plan.min_ids)
                mask_ids += plan.min_ids
            if plan.penalized:
                penalized.append(i)
        if not penalized:
            self._histories = {}
        if fresh:
            x = raw.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        elif bias_rows or mask_rows or penalized or raw.dtype != torch.float32:
            x = self._work.like("x", raw, torch.float32).copy_(raw)
        else:
            return raw
        if bias_rows:
            x.index_put_(
                (ints(bias_rows, device), ints(bias_ids, device)),
                floats(bias_values, device),
                accumulate=True,
            )
        if mask_rows:
            x.index_put_(
                (ints(mask_rows, device), ints(mask_ids, device)),
                torch.tensor(NEG_INF, device=device),
            )
        if penalized:
            self._penalize(
                x, [rows[i] for i in penalized], [plans[i] for i in penalized], penalized
            )
        return x

    def _penalize(
        self, x: torch.Tensor, rows: list[SamplingRow], plans: list[Plan], where: list[int]
    ) -> None:
        """Repetition penalty over prompt + output, then frequency and presence over output.

        Both touch only the tokens a row has seen, gathered from every row at once into
        flat indices of ``x``.
        """
        device = x.device
        old, histories = self._histories, {}
        seen, seen_rows, rep = [], [], []
        out, out_rows, freq, pres = [], [], [], []
        for k, (row, plan) in enumerate(zip(rows, plans, strict=True)):
            history = old.get(id(row))
            if history is None or history.row is not row:
                history = History(row)
            histories[id(row)] = history
            ids = history.update()
            if plan.repetition != 1.0 and ids.shape[0]:
                seen.append(ids)
                seen_rows.append(where[k])
                rep.append(plan.repetition)
            generated = ids[row.num_prompt_tokens :]
            if (plan.frequency != 0.0 or plan.presence != 0.0) and generated.shape[0]:
                out.append(generated)
                out_rows.append(where[k])
                freq.append(plan.frequency)
                pres.append(plan.presence)
        self._histories = histories
        vocab, flat = x.shape[1], x.view(-1)
        if seen:
            lengths = ints([t.shape[0] for t in seen], device)
            starts = torch.repeat_interleave(ints(seen_rows, device) * vocab, lengths)
            index = starts + torch.cat(seen).to(device)
            values = flat.index_select(0, index)
            penalty = torch.repeat_interleave(floats(rep, device), lengths)
            # A token seen twice is written twice, with the same value.
            flat.index_copy_(0, index, torch.where(values > 0, values / penalty, values * penalty))
        if out:
            lengths = ints([t.shape[0] for t in out], device)
            starts = torch.repeat_interleave(ints(out_rows, device) * vocab, lengths)
            index, counts = torch.unique(starts + torch.cat(out).to(device), return_counts=True)
            frequency = torch.zeros(x.shape[0], device=device)
            presence = torch.zeros(x.shape[0], device=device)
            frequency[ints(out_rows, device)] = floats(freq, device)
            presence[ints(out_rows, device)] = floats(pres, device)
            row_of = index // vocab
            flat.index_add_(0, index, -(frequency[row_of] * counts + presence[row_of]))
