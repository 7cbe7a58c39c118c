"""A deterministic stand-in for a worker, for the scheduler's unit tests.

It follows the step protocol the way a real worker must: it keeps each sequence's
tokens and block table from the plan diffs, writes every computed token into a
simulated paged KV cache (one token id per slot), and "samples" the next token as
a pure function of the history *read back from the cache through the block
table*. A block shared by mistake, a prefix hit on the wrong block, a table that
does not cover the tokens or a write into another sequence's block therefore
changes the tokens, and the tests, which compare with `reference_tokens`, fail.
Plans arrive as bytes, so the wire form is exercised too.
"""

from __future__ import annotations

import zlib
from array import array
from dataclasses import dataclass, field

from pagoda.v1 import step_pb2


def next_token(history: list[int], sample_index: int, vocab_size: int) -> int:
    """The token that follows ``history`` for sample ``sample_index``: a pure function."""
    data = array("I", history).tobytes() + sample_index.to_bytes(4, "little")
    return zlib.crc32(data) % vocab_size


def reference_tokens(
    prompt: list[int],
    *,
    vocab_size: int,
    max_tokens: int | None,
    max_model_len: int,
    eos_token_ids: tuple[int, ...] = (),
    stop_token_ids: tuple[int, ...] = (),
    min_tokens: int = 0,
    ignore_eos: bool = False,
    sample_index: int = 0,
) -> list[int]:
    """The output an uninterrupted, uncached run must produce."""
    tokens = list(prompt)
    out: list[int] = []
    while True:
        token = next_token(tokens, sample_index, vocab_size)
        tokens.append(token)
        out.append(token)
        stops = (token in eos_token_ids and not ignore_eos) or token in stop_token_ids
        if len(out) >= min_tokens and stops:
            return out
        if (max_tokens is not None and len(out) >= max_tokens) or len(tokens) >= max_model_len:
            return out


@dataclass
class _SeqState:
    tokens: list[int]
    table: list[int]
    num_computed: int
    sample_index: int


@dataclass
class PagedTokenWorker:
    """Executes StepPlans over a simulated paged cache of ``num_blocks`` x ``block_size`` slots."""

    num_blocks: int
    block_size: int
    vocab_size: int
    replica_id: int = 0
    epoch: int = 0
    last_step: int = 0
    seqs: dict[int, _SeqState] = field(default_factory=dict)
    cache: list[int | None] = field(default_factory=list)
    steps_run: int = 0
    tokens_computed: int = 0

    def __post_init__(self) -> None:
        self.cache = [None] * (self.num_blocks * self.block_size)

    def welcome(self, replica_id: int, epoch: int) -> None:
        """A (re)registration: all sequence state is dropped, as after a Welcome."""
        self.replica_id, self.epoch, self.last_step = replica_id, epoch, 0
        self.seqs.clear()

    def execute(self, plan_bytes: bytes) -> step_pb2.StepResult:
        plan = step_pb2.StepPlan.FromString(plan_bytes)
        result = step_pb2.StepResult(replica_id=plan.replica_id, epoch=plan.epoch, step=plan.step)
        error = self._check(plan)
        if error is not None:
            result.error.CopyFrom(error)
            return result
        self.last_step = plan.step
        for seq in list(plan.finished_seqs) + list(plan.preempted_seqs):
            del self.seqs[seq]
        work: list[tuple[int, int]] = []
        for new in plan.new_sequences:
            state = _SeqState(
                list(new.token_ids), list(new.block_ids), new.num_cached_tokens, new.sample_index
            )
            self.seqs[new.seq] = state
            work.append((new.seq, new.num_new_tokens))
        grants = {g.seq: list(g.block_ids) for g in plan.new_blocks}
        for seq, num_new in zip(plan.running_seqs, plan.running_num_new_tokens, strict=True):
            self.seqs[seq].table.extend(grants.pop(seq, []))
            work.append((seq, num_new))
        assert not grants, f"blocks granted to sequences not in the step: {list(grants)}"
        # Like one layer of a real model: every KV write of the step, then every read.
        for seq, num_new in work:
            self._write(self.seqs[seq], num_new)
        for new in plan.new_sequences:
            self._check_cached_prefix(new.seq, self.seqs[new.seq], new.num_cached_tokens)
        for seq, _ in work:
            state = self.seqs[seq]
            if state.num_computed == len(state.tokens):
                token = next_token(self._read(state), state.sample_index, self.vocab_size)
                state.tokens.append(token)
                result.seqs.append(seq)
                result.token_ids.append(token)
        self.steps_run += 1
        return result

    def _check(self, plan: step_pb2.StepPlan) -> step_pb2.StepError | None:
        if (plan.replica_id, plan.epoch) != (self.replica_id, self.epoch):
            return step_pb2.StepError(kind=step_pb2.StepError.STALE_EPOCH, detail="epoch")
        if plan.step != self.last_step + 1:
            return step_pb2.StepError(kind=step_pb2.StepError.STEP_GAP, detail=f"{plan.step}")
        for seq in [*plan.finished_seqs, *plan.preempted_seqs, *plan.running_seqs]:
            if seq not in self.seqs:
                return step_pb2.StepError(kind=step_pb2.StepError.UNKNOWN_SEQUENCE, detail=str(seq))
        return None

    def _slot(self, state: _SeqState, pos: int) -> int:
        block = state.table[pos // self.block_size]
        assert 0 <= block < self.num_blocks, f"block id {block} out of range"
        return block * self.block_size + pos % self.block_size

    def _write(self, state: _SeqState, num_new: int) -> None:
        end = state.num_computed + num_new
        assert num_new > 0 and end <= len(state.tokens), (
            "plan computes tokens the worker does not know"
        )
        for pos in range(state.num_computed, end):
            self.cache[self._slot(state, pos)] = state.tokens[pos]
        state.num_computed = end
        self.tokens_computed += num_new

    def _read(self, state: _SeqState) -> list[int]:
        return [self.cache[self._slot(state, pos)] for pos in range(state.num_computed)]

    def _check_cached_prefix(self, seq: int, state: _SeqState, num_cached: int) -> None:
        """A prefix hit must point at blocks holding exactly this prefix after the step's writes."""
        for pos in range(num_cached):
            held = self.cache[self._slot(state, pos)]
            assert held == state.tokens[pos], (
                f"seq {seq}: cached slot for position {pos} holds {held}"
            )
