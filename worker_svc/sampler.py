"""One batched sampler for a whole step: every sampling row of the step in one pass.

The model runner calls ``Sampler(logits, rows)`` once per step with one row of logits per
sequence that samples, and gets one token (and, where asked, its logprobs) per row. Each
row brings its own parameters; the work is done on the whole batch with a handful of
tensor operations whatever the mix, because a Python loop of tensor ops per row would
cost more than the model on a small CPU.

The order of operations, the exact definitions and the measured costs are in
docs/sampling.md. The points that shape this code:

* Randomness is counter-based (:func:`counter_uniforms`): one uniform number per row,
  a pure function of (seed, sample index, position), so a token does not depend on the
  other rows of the batch, and a sequence resumed after preemption or on another
  machine draws the same numbers. The token is an inverse-CDF draw of that number over
  the row's filtered distribution.
* Nothing sorts a whole row unless it must: greedy rows take a blocked argmax, rows
  without top-k/top-p draw through per-block masses, and top-k/top-p rows look only at a
  few candidate blocks (a full sort of 64 x 49k logits costs over 100 ms on a CPU).
* Candidates are ordered by a strict total order (higher logit first, then lower token
  id), so top-k keeps exactly k tokens and a row's result never depends on how many
  candidates the batch happened to gather.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from pagoda.sampling_params import SamplingParams
from pagoda.v1 import common_pb2

__all__ = [
    "GREEDY_TEMPERATURE",
    "Sampler",
    "SamplerOutput",
    "SamplingRow",
    "counter_uniforms",
    "prompt_logprobs",
]

# Temperatures below this are greedy, as in vLLM: dividing by them overflows float32, and
# the distribution is all but a point mass anyway.
GREEDY_TEMPERATURE = 1e-5

_LOG2E = 1.0 / math.log(2.0)
_NEG_INF = float("-inf")
# The smallest normal float32: ``z > -_TINY`` is ``z >= 0`` for any difference of floats.
_TINY = torch.finfo(torch.float32).tiny
# The min-p cut of a row without min-p: below every finite logit, and finite, so that
# ``-inf - cut`` is -inf rather than NaN.
_NO_CUT = torch.finfo(torch.float32).min

# Block widths. The argmax and the inverse CDF reduce a row block by block (a blocked
# amax or sum is vectorized; torch's CPU argmax and cumsum over a whole row are not);
# top-k/top-p candidates come from the best blocks of _CANDIDATE_BLOCK tokens.
_ARGMAX_BLOCK = 256
_CDF_BLOCK = 128
_CANDIDATE_BLOCK = 32
# Candidates gathered first for a top-p row; a row whose nucleus is wider gets
# _CANDIDATE_GROWTH times more, then its whole row ranked.
_FIRST_CANDIDATES = 64
_CANDIDATE_GROWTH = 16
# Prompt positions whose logprobs are computed at once (bounds the float32 copy).
_PROMPT_CHUNK = 256

# SplitMix64 constants, as two's-complement int64 for torch.
_MASK64 = (1 << 64) - 1


def _as_int64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _as_int64(0x9E3779B97F4A7C15)
_MIX1 = _as_int64(0xBF58476D1CE4E5B9)
_MIX2 = _as_int64(0x94D049BB133111EB)


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


@dataclass(slots=True)
class SamplerOutput:
    """One entry per row, in the order of the rows."""

    token_ids: list[int]
    logprobs: list[common_pb2.TokenLogprobs | None]


# --------------------------------------------------------------------------- randomness


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


# ---------------------------------------------------------------- buffers and ranking


class _Workspace:
    """Buffers kept from step to step, by name.

    A fresh tensor of a step's size (10 MB at 64 x 40k) costs the page faults of new
    memory whenever the allocator has handed the last one back to the system: on a
    2-core CPU, a bf16 temperature step took a median 9 ms with fresh buffers and 2.4 ms
    with these.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(
        self, name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        need = rows * cols
        buffer = self._buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffers[name] = torch.empty(need, dtype=dtype, device=device)
        elif buffer.numel() < need:
            size = max(need, 2 * buffer.numel())
            buffer = self._buffers[name] = torch.empty(size, dtype=dtype, device=device)
        return buffer[:need].view(rows, cols)

    def like(self, name: str, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.get(name, x.shape[0], x.shape[1], dtype or x.dtype, x.device)

    def rows(self, name: str, x: torch.Tensor, index: list[int]) -> torch.Tensor:
        """``x[index]``: x itself when index is every row in order, else a copy here."""
        if len(index) == x.shape[0] and index == list(range(x.shape[0])):
            return x
        out = self.get(name, len(index), x.shape[1], x.dtype, x.device)
        return torch.index_select(x, 0, _ints(index, x.device), out=out)


def _ints(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor from a non-empty list; three times faster than torch.tensor(list)."""
    return torch.frombuffer(array("q", values), dtype=torch.int64).to(device)


def _floats(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.frombuffer(array("f", values), dtype=torch.float32).to(device)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise index of the first maximum, as ``torch.argmax``, found block by block.

    torch's CPU argmax is not vectorized (1.7 ms for 64 x 32k float32, one thread); a
    blocked amax is, and the first block holding the row maximum holds its first
    occurrence. About 0.2 ms for 64 x 32k.
    """
    rows, width = x.shape
    if width <= 2 * _ARGMAX_BLOCK:
        return x.argmax(-1)
    blocks = width // _ARGMAX_BLOCK
    whole = blocks * _ARGMAX_BLOCK
    block_max = x[:, :whole].reshape(rows, blocks, _ARGMAX_BLOCK).amax(-1)
    if whole < width:
        block_max = torch.cat([block_max, x[:, whole:].amax(-1, keepdim=True)], 1)
    start = block_max.argmax(-1) * _ARGMAX_BLOCK
    cols = start[:, None] + torch.arange(_ARGMAX_BLOCK, device=x.device)
    # A short last block repeats its last column; the first maximum comes before repeats.
    cols.clamp_(max=width - 1)
    return start + x.gather(1, cols).argmax(-1)


def _order_keys(values: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """int64 keys in the candidates' total order: higher value first, then lower index.

    The float32 bits, sign-extended, are mapped to integers of the same order (negative
    floats have their magnitude bits flipped; -0.0 is first made +0.0 so equal values tie
    exactly), shifted up, and the reversed index fills the low 32 bits. ``index``
    broadcasts against ``values``.
    """
    keys = values.add(0.0).view(torch.int32).to(torch.int64)
    keys ^= (keys >> 31) & 0x7FFFFFFF
    keys *= 1 << 32
    keys += (width - 1) - index
    return keys


def _top_candidates(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best tokens of each row in the total order: (values, token ids), best first.

    The k best tokens lie in the k best blocks (blocks ranked by their maximum, the lower
    block first on ties), so only k * _CANDIDATE_BLOCK tokens are ranked while that is
    well under the row; past that, the whole row's order keys are ranked.
    """
    rows, width = x.shape
    k = min(k, width)
    if k * _CANDIDATE_BLOCK * 2 < width:
        blocks = -(-width // _CANDIDATE_BLOCK)
        whole = (width // _CANDIDATE_BLOCK) * _CANDIDATE_BLOCK
        block_max = x[:, :whole].reshape(rows, whole // _CANDIDATE_BLOCK, -1).amax(-1)
        if whole < width:
            block_max = torch.cat([block_max, x[:, whole:].amax(-1, keepdim=True)], 1)
        block_ids = torch.arange(blocks, device=x.device)
        best = _order_keys(block_max, block_ids, blocks).topk(k, -1, sorted=False).indices
        offsets = torch.arange(_CANDIDATE_BLOCK, device=x.device)
        index = (best[:, :, None] * _CANDIDATE_BLOCK + offsets).reshape(rows, -1)
        outside = index >= width  # the short last block's missing columns
        index = index.clamp(max=width - 1)
        keys = _order_keys(x.gather(1, index), index, width)
        keys.masked_fill_(outside, torch.iinfo(torch.int64).min)
    else:
        keys = _order_keys(x, torch.arange(width, device=x.device), width)
    if k * 8 >= width:  # most of the row: one sort is cheaper than topk
        top = keys.sort(-1, descending=True).values[:, :k]
    else:
        top = keys.topk(k, -1, sorted=True).values
    token_ids = (width - 1) - (top & 0xFFFFFFFF)
    return x.gather(1, token_ids), token_ids


def _below(u: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """u * total as float32, kept strictly below total (so the draw lands on a token)."""
    target = (u * total.double()).float()
    return torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))


def _mask_below(y: torch.Tensor, threshold: torch.Tensor, work: _Workspace | None) -> None:
    """Set ``y < threshold`` (per row, finite) to -inf in place; kept values stay bit-exact.

    A boolean mask costs ~15x more than these three vectorized passes on a CPU: kept
    entries get ``z = y - threshold >= 0`` (exact in sign), dropped ones ``z = -inf``,
    and ``min(y, z)`` is ``y`` where kept since ``y <= 0 <= z``.
    """
    z = torch.empty_like(y) if work is None else work.like("cut", y)
    torch.sub(y, threshold, out=z)
    F.threshold_(z, -_TINY, _NEG_INF)
    torch.minimum(y, z, out=y)


def _block_masses(
    x: torch.Tensor,
    top: torch.Tensor,
    scale: torch.Tensor,
    log2_min_p: torch.Tensor | None,
    work: _Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalized probabilities ``2**((x - top) * scale)`` and their per-block sums.

    ``scale`` is log2(e) / temperature, so these are softmax(x / T) up to a factor (exp2
    is ~3x faster than exp on a CPU). Entries under the min-p threshold are zero. The
    buffer is padded with zeros to whole _CDF_BLOCKs.
    """
    rows, width = x.shape
    blocks = -(-width // _CDF_BLOCK)
    if work is None:
        y = torch.empty((rows, blocks * _CDF_BLOCK), dtype=torch.float32, device=x.device)
    else:
        y = work.get("mass", rows, blocks * _CDF_BLOCK, torch.float32, x.device)
    if y.shape[1] > width:
        y[:, width:] = _NEG_INF
    torch.sub(x, top, out=y[:, :width])
    y.mul_(scale)
    if log2_min_p is not None:
        _mask_below(y, log2_min_p, work)
    y.exp2_()
    return y, y.view(rows, blocks, _CDF_BLOCK).sum(-1)


def _draw_from_blocks(mass: torch.Tensor, block_mass: torch.Tensor, u: torch.Tensor):
    """Inverse-CDF draw in token-id order: first the block, then the token inside it.

    Two short running sums instead of one over the row (torch's CPU cumsum is a scalar
    loop). Only tokens of positive mass can be drawn: the guards choose the heaviest
    block / token where rounding of a parallel running sum (GPU) would pick an empty one.
    """
    rows, blocks = block_mass.shape
    cdf = block_mass.cumsum(-1)
    target = _below(u, cdf[:, -1])
    block = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    block.clamp_(max=blocks - 1)
    block = torch.where(
        block_mass.gather(1, block[:, None]).squeeze(1) > 0, block, block_mass.argmax(-1)
    )
    before = cdf.gather(1, (block - 1).clamp(min=0)[:, None]).squeeze(1)
    before = torch.where(block > 0, before, torch.zeros_like(before))
    inside = mass.view(rows, blocks, _CDF_BLOCK)
    inside = inside.gather(1, block[:, None, None].expand(rows, 1, _CDF_BLOCK)).squeeze(1)
    local = inside.cumsum(-1)
    rest = torch.minimum(
        (target - before).clamp(min=0.0),
        torch.nextafter(local[:, -1], torch.zeros_like(before)),
    )
    pick = torch.searchsorted(local, rest[:, None], right=True).squeeze(1)
    pick.clamp_(max=_CDF_BLOCK - 1)
    pick = torch.where(inside.gather(1, pick[:, None]).squeeze(1) > 0, pick, inside.argmax(-1))
    return block * _CDF_BLOCK + pick


def _row_maxima(x: torch.Tensor) -> torch.Tensor:
    """amax per row as a column; a row of -inf gets 0 so that x - max stays -inf, not NaN."""
    return torch.nan_to_num(x.amax(-1, keepdim=True), neginf=0.0)


# ------------------------------------------------------------------------------ logprobs


def _token_logprobs(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    num_top: list[int],
    work: _Workspace | None = None,
) -> list[common_pb2.TokenLogprobs]:
    """Logprobs of ``token_ids`` (one per row) and each row's ``num_top`` best tokens.

    From the log-softmax of the logits given (the raw ones, in the sampler). The rank is
    1 + the number of tokens with a strictly higher logit; the top tokens are in the
    candidates' total order (ties: lower id first).
    """
    work = work or _Workspace()
    z = logits if logits.dtype == torch.float32 else work.like("z", logits, torch.float32)
    if z is not logits:
        z.copy_(logits)
    scratch = work.like("scratch", z)
    chosen = z.gather(1, token_ids[:, None])
    # Counted as sum(sign(z - chosen where > 0, else 0)): a boolean compare and its sum
    # cost 3x more. The threshold also turns -inf - -inf = NaN into 0.
    torch.sub(z, chosen, out=scratch)
    ranks = F.threshold_(scratch, 0.0, 0.0).sign_().sum(-1).long() + 1
    top = _row_maxima(z)
    torch.sub(z, top, out=scratch)
    lse = top.squeeze(1) + torch.log(scratch.mul_(_LOG2E).exp2_().sum(-1))
    logprob = chosen.squeeze(1) - lse
    most = max(num_top)
    if most > 0:
        values, ids = _top_candidates(z, most)
        top_ids, top_lps = ids.tolist(), (values - lse[:, None]).tolist()
    out = []
    for i, (tok, lp, rank) in enumerate(
        zip(token_ids.tolist(), logprob.tolist(), ranks.tolist(), strict=True)
    ):
        entry = common_pb2.TokenLogprobs(token_id=tok, logprob=lp, rank=rank)
        if num_top[i]:
            entry.top_token_ids.extend(top_ids[i][: num_top[i]])
            entry.top_logprobs.extend(top_lps[i][: num_top[i]])
        out.append(entry)
    return out


@torch.no_grad()
def prompt_logprobs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    num_top: int,
    *,
    vocab_size: int | None = None,
) -> list[common_pb2.TokenLogprobs]:
    """Logprobs of prompt tokens: ``target_ids[i]`` under ``logits[i]`` (position i + 1).

    One entry per row with its rank and the ``num_top`` most likely tokens, from the raw
    logits' log-softmax (as sampled tokens' logprobs). Columns at or past ``vocab_size``
    (a padded LM head) are ignored. Rows are done in chunks so a long prompt never needs
    a float32 copy of all its logits at once.
    """
    if logits.dim() != 2 or target_ids.dim() != 1 or target_ids.shape[0] != logits.shape[0]:
        raise ValueError("prompt_logprobs needs logits [P, V] and target_ids [P]")
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    target_ids = target_ids.to(device=logits.device, dtype=torch.int64)
    out: list[common_pb2.TokenLogprobs] = []
    work = _Workspace()
    for start in range(0, logits.shape[0], _PROMPT_CHUNK):
        stop = min(start + _PROMPT_CHUNK, logits.shape[0])
        chunk, targets = logits[start:stop], target_ids[start:stop]
        out.extend(_token_logprobs(chunk, targets, [num_top] * (stop - start), work))
    return out


# ------------------------------------------------------------------------------- sampler


class _Plan:
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
        self.scale = 0.0 if self.greedy else _LOG2E / params.temperature
        self.top_k = params.top_k if 0 < params.top_k < vocab_size else 0
        self.top_p = params.top_p if params.top_p < 1.0 else 1.0
        self.log2_min_p = math.log2(params.min_p) if params.min_p > 0.0 else _NO_CUT
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


class _History:
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
            self.ids = torch.cat([self.ids, _ints(tokens[have:], self.ids.device)])
            self.last = tokens[-1]
        return self.ids


class Sampler:
    """Samples one token per row of a step's logits, each row with its own parameters."""

    def __init__(self, vocab_size: int, eos_token_ids: Sequence[int]):
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        # Keyed by id() with the object held, so an id is never reused while cached;
        # entries not seen in a step are dropped.
        self._plans: dict[int, tuple[SamplingParams, _Plan]] = {}
        self._histories: dict[int, _History] = {}
        self._work = _Workspace()

    # ------------------------------------------------------------------------- public

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        raw, plans = self._prepare(logits, rows)
        work = self._work
        if all(plan.plain for plan in plans):  # greedy, nothing to apply: one argmax
            x = raw if raw.dtype == torch.float32 else work.like("x", raw, torch.float32)
            if x is not raw:
                x.copy_(raw)
            return SamplerOutput(_argmax(x).tolist(), [None] * len(rows))
        x = self._processed(raw, rows, plans)
        device = x.device
        greedy = [i for i, plan in enumerate(plans) if plan.greedy]
        sampled = [i for i, plan in enumerate(plans) if not plan.greedy]
        if not sampled:
            tokens = _argmax(x)
        elif not greedy:
            tokens = self._sample(x, rows, plans)
        else:
            tokens = torch.empty(len(rows), dtype=torch.int64, device=device)
            tokens[_ints(greedy, device)] = _argmax(work.rows("greedy", x, greedy))
            tokens[_ints(sampled, device)] = self._sample(
                work.rows("sampled", x, sampled),
                [rows[i] for i in sampled],
                [plans[i] for i in sampled],
            )
        logprobs: list[common_pb2.TokenLogprobs | None] = [None] * len(rows)
        asked = [i for i, plan in enumerate(plans) if plan.logprobs is not None]
        if asked:
            entries = _token_logprobs(
                work.rows("asked", raw, asked),
                tokens[_ints(asked, device)],
                [plans[i].logprobs for i in asked],
                work,
            )
            for i, entry in zip(asked, entries, strict=True):
                logprobs[i] = entry
        return SamplerOutput(tokens.tolist(), logprobs)

    @torch.no_grad()
    def processed_logits(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """float32 [R, vocab_size]: the logits after bias, min_tokens and penalties.

        Greedy rows take the argmax of these; sampled rows draw from the softmax of these
        over their temperature, after min-p, top-k and top-p. Always a new tensor.
        """
        raw, plans = self._prepare(logits, rows)
        return self._processed(raw, rows, plans, fresh=True)

    def prompt_logprobs(
        self, logits: torch.Tensor, target_ids: torch.Tensor, num_top: int
    ) -> list[common_pb2.TokenLogprobs]:
        """:func:`prompt_logprobs` with this sampler's vocabulary size."""
        return prompt_logprobs(logits, target_ids, num_top, vocab_size=self.vocab_size)

    # ------------------------------------------------------------------------ the step

    def _prepare(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow]
    ) -> tuple[torch.Tensor, list[_Plan]]:
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
                entry = (params, _Plan(params, self.vocab_size, self.eos_token_ids))
            seen[id(params)] = entry
            plans.append(entry[1])
        self._plans = seen
        return raw, plans

    def _processed(
        self,
        raw: torch.Tensor,
        rows: Sequence[SamplingRow],
        plans: list[_Plan],
        fresh: bool = False,
    ) -> torch.Tensor:
        """float32 logits after, in vLLM's order: logit_bias, min_tokens masking,
        repetition penalty, frequency and presence penalties. One indexed op per kind
        for the whole batch. ``raw`` itself when there is nothing to do."""
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
            if plan.repetition != 1.0 or plan.frequency != 0.0 or plan.presence != 0.0:
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
                (_ints(bias_rows, device), _ints(bias_ids, device)),
                _floats(bias_values, device),
                accumulate=True,
            )
        if mask_rows:
            x.index_put_(
                (_ints(mask_rows, device), _ints(mask_ids, device)),
                torch.tensor(_NEG_INF, device=device),
            )
        if penalized:
            self._penalize(
                x, [rows[i] for i in penalized], [plans[i] for i in penalized], penalized
            )
        return x

    def _penalize(
        self, x: torch.Tensor, rows: list[SamplingRow], plans: list[_Plan], where: list[int]
    ) -> None:
        """Repetition penalty over prompt + output, then frequency and presence over output.

        Both touch only the tokens a row has seen, gathered from every row at once into
        flat indices of ``x``; no [rows, vocab] mask is built.
        """
        device = x.device
        old, histories = self._histories, {}
        seen, seen_rows, rep = [], [], []
        out, out_rows, freq, pres = [], [], [], []
        for k, (row, plan) in enumerate(zip(rows, plans, strict=True)):
            history = old.get(id(row))
            if history is None or history.row is not row:
                history = _History(row)
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
            lengths = _ints([t.shape[0] for t in seen], device)
            starts = torch.repeat_interleave(_ints(seen_rows, device) * vocab, lengths)
            index = starts + torch.cat(seen).to(device)
            values = flat.index_select(0, index)
            penalty = torch.repeat_interleave(_floats(rep, device), lengths)
            # A token seen twice is written twice, with the same value.
            flat.index_copy_(0, index, torch.where(values > 0, values / penalty, values * penalty))
        if out:
            lengths = _ints([t.shape[0] for t in out], device)
            starts = torch.repeat_interleave(_ints(out_rows, device) * vocab, lengths)
            index, counts = torch.unique(starts + torch.cat(out).to(device), return_counts=True)
            frequency = torch.zeros(x.shape[0], device=device)
            presence = torch.zeros(x.shape[0], device=device)
            frequency[_ints(out_rows, device)] = _floats(freq, device)
            presence[_ints(out_rows, device)] = _floats(pres, device)
            row_of = index // vocab
            flat.index_add_(0, index, -(frequency[row_of] * counts + presence[row_of]))

    def _sample(
        self, x: torch.Tensor, rows: Sequence[SamplingRow], plans: list[_Plan]
    ) -> torch.Tensor:
        """Draws one token per row of processed logits ``x`` (every row samples)."""
        device = x.device
        seeds, indices, positions = [], [], []
        for row in rows:
            seed = row.seed & _MASK64
            seeds.append(seed - (1 << 64) if seed >= 1 << 63 else seed)
            indices.append(row.sample_index)
            positions.append(len(row.token_ids))
        u = counter_uniforms(_ints(seeds, device), _ints(indices, device), _ints(positions, device))
        scale = _floats([plan.scale for plan in plans], device)[:, None]
        full = [i for i, plan in enumerate(plans) if not plan.top_k and plan.top_p >= 1.0]
        if len(full) == len(plans):
            return self._sample_full(x, plans, scale, u)
        if not full:
            return self._sample_ranked(x, plans, scale, u)
        skip = set(full)
        ranked = [i for i in range(len(plans)) if i not in skip]
        tokens = torch.empty(len(plans), dtype=torch.int64, device=device)
        for group, method in ((full, self._sample_full), (ranked, self._sample_ranked)):
            index = _ints(group, device)
            part = self._work.rows("group", x, group)
            tokens[index] = method(part, [plans[i] for i in group], scale[index], u[index])
        return tokens

    def _sample_full(
        self, x: torch.Tensor, plans: list[_Plan], scale: torch.Tensor, u: torch.Tensor
    ) -> torch.Tensor:
        """Rows without top-k/top-p: temperature and min-p over the whole row."""
        _, log2_min_p = _min_p_cuts(plans, x.device)
        mass, block_mass = _block_masses(x, _row_maxima(x), scale, log2_min_p, self._work)
        return _draw_from_blocks(mass, block_mass, u)

    def _sample_ranked(
        self, x: torch.Tensor, plans: list[_Plan], scale: torch.Tensor, u: torch.Tensor
    ) -> torch.Tensor:
        """Rows with top-k and/or top-p: a draw over the best tokens, best first.

        min-p and top-k cut the ranked list at a count; top-p then keeps the shortest
        prefix whose mass reaches top_p of what is left (vLLM's order: min-p, top-k,
        top-p). A top-p row without top-k needs the mass of its whole row (one pass as
        in _sample_full) and, when its nucleus is wider than the candidates gathered,
        another round with more of them; the answer is the same either way.
        """
        device = x.device
        rows, width = x.shape
        top_k = _ints([plan.top_k for plan in plans], device)
        top_p = _floats([plan.top_p for plan in plans], device)
        min_p_values, log2_min_p = _min_p_cuts(plans, device)
        min_p_cut = _floats(min_p_values, device)
        has_k, has_p = top_k > 0, top_p < 1.0
        whole = torch.zeros(rows, dtype=torch.float32, device=device)
        nucleus = [i for i, plan in enumerate(plans) if plan.top_p < 1.0 and not plan.top_k]
        if nucleus:
            index = _ints(nucleus, device)
            part = self._work.rows("nucleus", x, nucleus)
            cut = None if log2_min_p is None else log2_min_p[index]
            _, block_mass = _block_masses(part, _row_maxima(part), scale[index], cut, self._work)
            whole[index] = block_mass.cumsum(-1)[:, -1]
        k = min(width, max([_FIRST_CANDIDATES] + [plan.top_k for plan in plans]))
        tokens = torch.empty(rows, dtype=torch.int64, device=device)
        todo = torch.arange(rows, device=device)
        part = x
        while True:
            values, ids = _top_candidates(part, k)
            y = (values - torch.nan_to_num(values[:, :1], neginf=0.0)) * scale[todo]
            mass = torch.exp2(y)
            cdf = mass.cumsum(-1)
            kept_min_p = (y >= min_p_cut[todo, None]).sum(-1)
            kept = torch.minimum(torch.where(has_k[todo], top_k[todo], k), kept_min_p)
            kept.clamp_(min=1)  # the best token always stays (0 only for a row of -inf)
            total = torch.where(
                has_k[todo], cdf.gather(1, (kept - 1)[:, None]).squeeze(1), whole[todo]
            )
            nucleus_mass = top_p[todo] * total
            under = torch.searchsorted(cdf, nucleus_mass[:, None]).squeeze(1)
            kept = torch.where(has_p[todo], torch.minimum(under + 1, kept), kept)
            target = _below(u[todo], cdf.gather(1, (kept - 1)[:, None]).squeeze(1))
            pick = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
            pick = torch.minimum(pick, kept - 1)
            pick = torch.where(mass.gather(1, pick[:, None]).squeeze(1) > 0, pick, 0)
            tokens[todo] = ids.gather(1, pick[:, None]).squeeze(1)
            if k >= width or not nucleus:
                return tokens
            # A nucleus wider than the candidates: only top-p rows without top-k, whose
            # min-p cut (if any) is not within the candidates either.
            wider = has_p[todo] & ~has_k[todo] & (kept_min_p >= k) & (under >= k)
            if not bool(wider.any()):
                return tokens
            grow = k * _CANDIDATE_GROWTH
            # Each token past the candidates weighs at most as much as the last of them:
            # where even `grow` such tokens cannot reach the nucleus, rank the whole row.
            reach = cdf[:, -1] + (grow - k) * mass[:, -1]
            if grow * 8 >= width or bool((reach < nucleus_mass)[wider].all()):
                grow = width
            todo = todo[wider]
            part = x.index_select(0, todo)
            k = grow


def _min_p_cuts(
    plans: list[_Plan], device: torch.device
) -> tuple[list[float], torch.Tensor | None]:
    """log2(min_p) per row (_NO_CUT without min-p), as a column; None when no row cuts."""
    values = [plan.log2_min_p for plan in plans]
    if all(v == _NO_CUT for v in values):
        return values, None
    return values, _floats(values, device)[:, None]
