"""The scheduling policy: one global queue, replicas that come and go, one token-budget loop.

Pure Python with no sockets, no asyncio and no clock: the service shell (or the
offline ``LLM``) feeds it requests and step results, asks it for the next plan of
a replica, and moves the messages. Requests wait in one global queue (FCFS, or by
priority where a lower value runs first) and are bound to a replica when admitted.
``schedule(replica, now)`` runs one loop over a token budget, as vLLM V1 does:
each sequence moves ``num_computed_tokens`` toward its length, running sequences
first (a decode costs one token, an unfinished prefill continues), then waiting
ones from the head of the queue, a long prompt in chunks. When blocks run out, the
latest-arrived (or lowest-priority) running sequence is preempted and recomputed
later, its generated tokens kept.

On top of that loop: a draining replica admits nothing new; the queue is bounded
(``QueueFull``); requests past their deadline end (``expire``); and a request waits a
bounded time for a better replica than the one asking: one that caches more of its
prefix (prefix affinity), or as much while running fewer sequences (load spread),
docs/scheduler.md.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from pagoda.sampling_params import SamplingParams
from pagoda.v1 import common_pb2, session_pb2, step_pb2
from scheduler_svc.block_hash import extend_hashes, extra_keys
from scheduler_svc.block_manager import BlockManager
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.sequence import UNLIMITED, Request, Sequence, Status

STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH
ABORT = common_pb2.FINISH_REASON_ABORT

_UINT64 = 2**64 - 1
# A replica's admission looks at most this many requests left for other replicas (prefix
# affinity, load spread) in one step before it stops admitting: the walk stays short.
AFFINITY_LOOKAHEAD = 64

WaitingEntry = tuple[tuple[int, float, int], int, Sequence]


class QueueFull(ValueError):
    """The waiting queue is at one of its bounds; the same submit may succeed later."""


@dataclass(eq=False, slots=True)
class Replica:
    """One model copy as the scheduler sees it: blocks, running sequences, step count."""

    replica_id: int
    epoch: int
    blocks: BlockManager
    running: list[Sequence] = field(default_factory=list)
    # The last plan's step number in this epoch (plans count from 1).
    step: int = 0
    # Sequences to tell the worker about in the next plan.
    pending_finished: list[int] = field(default_factory=list)
    pending_preempted: list[int] = field(default_factory=list)
    # A draining replica runs what it holds and admits nothing new.
    draining: bool = False
    # The earliest ``now`` at which a request this replica left for another one (prefix
    # affinity) becomes its to take; None when its last schedule left none.
    deferred_until: float | None = None


@dataclass(slots=True)
class _Outputs:
    """The columns of one owner's StepOutputs, filled during update()."""

    request_ids: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[session_pb2.DeltaLogprobs] = field(default_factory=list)
    finished: list[session_pb2.SequenceFinished] = field(default_factory=list)

    def build(self) -> session_pb2.StepOutputs:
        return session_pb2.StepOutputs(
            request_ids=self.request_ids,
            indices=self.indices,
            token_ids=self.token_ids,
            logprobs=self.logprobs,
            finished=self.finished,
        )


class Scheduler:
    """Continuous batching over any number of replicas, with one global waiting queue."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self._replicas: dict[int, Replica] = {}
        self._requests: dict[tuple[str, str], Request] = {}
        self._seqs: dict[int, Sequence] = {}  # every unfinished sequence, by handle
        # The global queue: a heap by sort_key. An entry is live while its sequence waits
        # and names it as its ``queue_entry``; others (aborted, admitted from behind the
        # head, re-queued under a newer entry) are skipped and dropped on reaching the top.
        self._waiting: list[WaitingEntry] = []
        self._next_entry = 1
        self._num_waiting = 0
        self._waiting_tokens = 0
        # Requests with a deadline: a heap of (deadline_unix_ms, first seq id, request);
        # entries of requests that ended meanwhile are skipped.
        self._deadlines: list[tuple[int, int, Request]] = []
        self._next_seq_id = 1
        self._next_epoch = 1
        self.num_preemptions = 0
        self._eos = frozenset(config.eos_token_ids)
        self._rng = random.Random(config.seed)

    # -- membership --------------------------------------------------------------

    def join(self, replica_id: int, num_blocks: int) -> int:
        """A replica with ``num_blocks`` KV blocks starts taking work; returns its epoch."""
        if replica_id in self._replicas:
            raise ValueError(f"replica {replica_id} has already joined")
        cfg = self.config
        if num_blocks * cfg.block_size < cfg.max_model_len:
            raise ValueError(
                f"replica {replica_id}: {num_blocks} blocks of {cfg.block_size} tokens cannot hold "
                f"one sequence of max_model_len {cfg.max_model_len}"
            )
        epoch = self._next_epoch
        self._next_epoch += 1
        blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self._replicas[replica_id] = Replica(replica_id, epoch, blocks)
        return epoch

    def leave(self, replica_id: int) -> None:
        """A replica is gone: its blocks are dropped and its sequences wait to be recomputed."""
        replica = self._replicas.pop(replica_id)
        for seq in replica.running:
            self._requeue(seq)

    def reset(self, replica_id: int) -> int:
        """Start a replica afresh (its worker saw a gap or a stale epoch); returns the new epoch."""
        num_blocks = self._replicas[replica_id].blocks.num_blocks
        self.leave(replica_id)
        return self.join(replica_id, num_blocks)

    def drain(self, replica_id: int) -> None:
        """The replica's worker is leaving: it admits nothing new, its running sequences go
        on, and no other replica leaves a request for it. ``leave`` it once it runs nothing
        (or when its grace period ends: what is left is re-queued)."""
        self._replicas[replica_id].draining = True

    def replica(self, replica_id: int) -> Replica:
        return self._replicas[replica_id]

    @property
    def replica_ids(self) -> list[int]:
        return list(self._replicas)

    # -- requests ----------------------------------------------------------------

    def add(self, submit: session_pb2.Submit, now: float, owner: str = "") -> None:
        """Queue a request's n sequences. Raises ValueError on invalid input, and QueueFull
        (a ValueError) when the queue cannot take them now; either way it changes nothing.
        """
        cfg = self.config
        key = (owner, submit.request_id)
        if not submit.request_id:
            raise ValueError("request_id must not be empty")
        if key in self._requests:
            raise ValueError(f"request {submit.request_id!r} is already running")
        prompt = list(submit.prompt_token_ids)
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        if cfg.vocab_size is not None and max(prompt) >= cfg.vocab_size:
            raise ValueError(
                f"token id {max(prompt)} is out of range: the vocabulary has {cfg.vocab_size}"
            )
        if len(prompt) > cfg.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens; this model's maximum context length "
                f"is {cfg.max_model_len}"
            )
        params = SamplingParams.from_proto(submit.sampling)
        self._check_room(params.n, params.n * len(prompt))
        policy_priority = submit.priority if cfg.policy == "priority" else 0
        request = Request(
            owner=owner,
            request_id=submit.request_id,
            sampling=submit.sampling,
            priority=submit.priority,
            arrival_time=now,
            seed=params.seed,
            extra_hash=extra_keys(submit.lora_id, submit.cache_salt),
            uses_prefix_cache=params.prompt_logprobs is None,
            lora_id=submit.lora_id,
            structured_output=submit.structured_output
            if submit.HasField("structured_output")
            else None,
            deadline_unix_ms=submit.deadline_unix_ms,
        )
        hashes: list[bytes] = []
        if cfg.enable_prefix_caching:
            extend_hashes(hashes, prompt, cfg.block_size, request.extra_hash)
        for index in range(params.n):
            seq_id = self._next_seq_id
            self._next_seq_id += 1
            seq = Sequence(
                seq_id=seq_id,
                request=request,
                index=index,
                token_ids=list(prompt),
                num_prompt_tokens=len(prompt),
                sort_key=(policy_priority, now, seq_id),
                max_tokens=UNLIMITED if params.max_tokens is None else params.max_tokens,
                min_tokens=params.min_tokens,
                ignore_eos=params.ignore_eos,
                stop_token_ids=frozenset(params.stop_token_ids),
                block_hashes=list(hashes),
            )
            request.sequences.append(seq)
            self._seqs[seq_id] = seq
            self._push_waiting(seq)
        request.num_unfinished = params.n
        self._requests[key] = request
        if request.deadline_unix_ms:
            self._push_deadline(request)

    def _check_room(self, num_seqs: int, num_tokens: int) -> None:
        """Raise QueueFull unless the queue can take ``num_seqs`` more sequences holding
        ``num_tokens`` tokens; ValueError when it never could, however empty."""
        cfg = self.config
        bounds = [
            (bound, now, more, what)
            for bound, now, more, what in (
                (cfg.max_waiting_requests, self._num_waiting, num_seqs, "sequences"),
                (cfg.max_waiting_tokens, self._waiting_tokens, num_tokens, "prompt tokens"),
            )
            if bound is not None
        ]
        for bound, _, more, what in bounds:
            if more > bound:
                raise ValueError(
                    f"the request needs {more} {what} in the waiting queue, which holds "
                    f"at most {bound}"
                )
        for bound, now, more, what in bounds:
            if now + more > bound:
                raise QueueFull(
                    f"the waiting queue is full ({now} {what} waiting, at most {bound}); "
                    "retry later"
                )

    def abort(self, request_id: str, owner: str = "") -> bool:
        """End every sequence of a request, in whatever state; False if it is unknown."""
        request = self._requests.get((owner, request_id))
        if request is None:
            return False
        for seq in request.sequences:
            if seq.status is not Status.FINISHED:
                self._end(seq, ABORT, remove_from_running=True)
        return True

    def abort_owner(self, owner: str) -> int:
        """End every request of one owner (a gateway session that broke); returns how many."""
        keys = [key for key in self._requests if key[0] == owner]
        for _, request_id in keys:
            self.abort(request_id, owner)
        return len(keys)

    def abort_unadmitted(self) -> dict[str, list[session_pb2.SequenceFinished]]:
        """End every sequence still waiting for its first admission (a draining scheduler
        starts nothing new); returns their final records (reason "abort") by owner.

        Sequences waiting to resume after a preemption or a replica's death have
        streamed tokens already: they stay queued and finish.
        """
        records: dict[str, list[session_pb2.SequenceFinished]] = {}
        for seq in list(self._waiting_seqs()):
            if not seq.admitted_once:
                records.setdefault(seq.request.owner, []).append(self._end(seq, ABORT))
        return records

    def expire(self, now_unix_ms: int) -> dict[str, list[session_pb2.SequenceFinished]]:
        """End every request whose deadline has passed, waiting or running (reason "abort");
        returns their final records by owner. The caller passes wall-clock time, since a
        deadline is a Unix time."""
        records: dict[str, list[session_pb2.SequenceFinished]] = {}
        heap = self._deadlines
        while heap and heap[0][0] <= now_unix_ms:
            _, _, request = heapq.heappop(heap)
            if self._requests.get(request.key) is not request:
                continue  # it ended before its deadline
            out = records.setdefault(request.owner, [])
            for seq in request.sequences:
                if seq.status is not Status.FINISHED:
                    out.append(self._end(seq, ABORT, remove_from_running=True))
        return records

    def finish(
        self, request_id: str, index: int, reason: int = STOP, owner: str = ""
    ) -> session_pb2.SequenceFinished | None:
        """End one sequence (the gateway found a stop string); its siblings go on.

        Returns its final record, or None when it is unknown or already over.
        """
        request = self._requests.get((owner, request_id))
        if request is None or not 0 <= index < len(request.sequences):
            return None
        seq = request.sequences[index]
        if seq.status is Status.FINISHED:
            return None
        return self._end(seq, reason, remove_from_running=True)

    # -- the step ------------------------------------------------------------------

    def schedule(self, replica_id: int, now: float) -> step_pb2.StepPlan | None:
        """The next step for one replica, or None when it has nothing to run or to drop.

        ``now`` is the caller's clock: the policy reads none of its own (prefix affinity
        measures its wait with it).
        """
        replica = self._replicas[replica_id]
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        blocks = replica.blocks
        running = replica.running
        scheduled: dict[Sequence, tuple[int, list[int]]] = {}
        preempted = False

        # Running sequences first: each decode costs one token, an unfinished prefill continues.
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            num_new = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            if num_new <= 0:  # its next token is not back yet
                i += 1
                continue
            new_blocks = blocks.grow(seq.seq_id, seq.num_computed_tokens + num_new)
            while new_blocks is None:
                victim = max(running, key=_sort_key)
                victim_pos = running.index(victim)
                del running[victim_pos]
                self._preempt(replica, victim)
                preempted = True
                if victim is seq:
                    break
                if victim_pos < i:
                    i -= 1
                    undone = scheduled.pop(victim, None)
                    if undone is not None:
                        budget += undone[0]
                new_blocks = blocks.grow(seq.seq_id, seq.num_computed_tokens + num_new)
            if new_blocks is None:  # seq itself was the victim; running[i] is now the next one
                continue
            scheduled[seq] = (num_new, new_blocks)
            budget -= num_new
            i += 1

        plan = step_pb2.StepPlan(replica_id=replica_id, epoch=replica.epoch)
        running_ids = []
        running_new = []
        bs = cfg.block_size
        for seq, (num_new, new_blocks) in scheduled.items():
            before = seq.num_computed_tokens
            seq.num_computed_tokens = before + num_new
            if (before + num_new) // bs > before // bs:
                blocks.register(
                    seq.seq_id,
                    seq.block_hashes,
                    seq.token_ids,
                    seq.num_computed_tokens,
                    seq.request.extra_hash,
                )
            running_ids.append(seq.seq_id)
            running_new.append(num_new)
            if new_blocks:
                plan.new_blocks.add(seq=seq.seq_id, block_ids=new_blocks)

        # Then waiting sequences from the head of the global queue, while budget and blocks last.
        # A step that had to preempt admits nothing: the pool is already too small. Nor does
        # a draining replica.
        replica.deferred_until = None
        if not preempted and not replica.draining:
            self._admit(replica, budget, plan, now)

        if not (
            scheduled or plan.new_sequences or replica.pending_finished or replica.pending_preempted
        ):
            return None
        replica.step += 1
        plan.step = replica.step
        plan.running_seqs.extend(running_ids)
        plan.running_num_new_tokens.extend(running_new)
        plan.finished_seqs.extend(replica.pending_finished)
        plan.preempted_seqs.extend(replica.pending_preempted)
        replica.pending_finished.clear()
        replica.pending_preempted.clear()
        return plan

    def update(self, result: step_pb2.StepResult) -> dict[str, session_pb2.StepOutputs]:
        """Apply a step's sampled tokens; returns one StepOutputs per owner that advanced.

        A result from another epoch, one that reports an error, and a token for a
        sequence that has ended, was preempted or moved since the plan are dropped:
        the caller resets a replica whose worker reported an error.
        """
        replica = self._replicas.get(result.replica_id)
        if replica is None or result.epoch != replica.epoch or result.error.kind:
            return {}
        if len(result.seqs) != len(result.token_ids):
            raise ValueError(
                f"step result has {len(result.seqs)} sequences but {len(result.token_ids)} tokens"
            )
        outputs: dict[str, _Outputs] = {}
        seqs = self._seqs
        replica_id = replica.replica_id
        cfg = self.config
        bs = cfg.block_size
        max_len = cfg.max_model_len
        hashing = cfg.enable_prefix_caching
        eos = self._eos
        token_logprobs = {e.seq: e.positions for e in result.logprobs} if result.logprobs else None
        for entry in result.prompt_logprobs:
            seq = seqs.get(entry.seq)
            if seq is None or seq.replica_id != replica_id:
                continue
            positions = _unsent_prompt_logprobs(seq, entry)
            if positions:
                out = outputs.setdefault(seq.request.owner, _Outputs())
                out.logprobs.append(
                    session_pb2.DeltaLogprobs(
                        request_id=seq.request.request_id, index=seq.index, prompt=positions
                    )
                )
        any_finished = False
        for seq_id, token in zip(result.seqs, result.token_ids, strict=True):
            seq = seqs.get(seq_id)
            if (
                seq is None
                or seq.replica_id != replica_id
                or seq.num_computed_tokens != len(seq.token_ids)
            ):
                continue
            request = seq.request
            tokens = seq.token_ids
            tokens.append(token)
            num_tokens = len(tokens)
            if hashing and num_tokens % bs == 0:
                extend_hashes(seq.block_hashes, tokens, bs, request.extra_hash)
            out = outputs.get(request.owner)
            if out is None:
                out = outputs[request.owner] = _Outputs()
            out.request_ids.append(request.request_id)
            out.indices.append(seq.index)
            out.token_ids.append(token)
            if token_logprobs is not None and seq_id in token_logprobs:
                out.logprobs.append(
                    session_pb2.DeltaLogprobs(
                        request_id=request.request_id,
                        index=seq.index,
                        tokens=token_logprobs[seq_id],
                    )
                )
            num_output = num_tokens - seq.num_prompt_tokens
            if num_output >= seq.min_tokens and (
                (token in eos and not seq.ignore_eos) or token in seq.stop_token_ids
            ):
                out.finished.append(self._end(seq, STOP, stop_token_id=token))
                any_finished = True
            elif num_output >= seq.max_tokens or num_tokens >= max_len:
                out.finished.append(self._end(seq, LENGTH))
                any_finished = True
        if any_finished:
            replica.running = [s for s in replica.running if s.status is Status.RUNNING]
        return {owner: out.build() for owner, out in outputs.items()}

    def _admit(self, replica: Replica, budget: int, plan: step_pb2.StepPlan, now: float) -> None:
        """Admit waiting sequences in queue order while the budget, ``max_num_seqs`` and the
        blocks last. One that does not fit stops admission (the queue order holds); one left
        for a better replica (prefix affinity, load spread) keeps its place, and the next
        one behind it may be admitted."""
        cfg = self.config
        bs = cfg.block_size
        blocks = replica.blocks
        running = replica.running
        passed = 0
        # Sequences this walk left for each other replica: they count as that replica's
        # load, so that a burst splits evenly instead of all going to the second replica.
        spread: dict[int, int] = {}
        for seq in self._in_queue_order():
            if budget <= 0 or len(running) >= cfg.max_num_seqs:
                break
            num_tokens = len(seq.token_ids)
            if seq.request.uses_prefix_cache:
                hits = blocks.lookup(seq.block_hashes, num_tokens)
                num_queried = min(len(seq.block_hashes), (num_tokens - 1) // bs)
            else:
                hits, num_queried = [], 0
            if self._leave_for_another(replica, seq, len(hits), now, spread):
                passed += 1
                if passed >= AFFINITY_LOOKAHEAD:
                    break
                continue
            num_cached = len(hits) * bs
            num_new = min(num_tokens - num_cached, budget)
            table = blocks.admit(seq.seq_id, hits, num_cached + num_new, num_queried)
            if table is None:
                break
            self._take_waiting(seq)
            self._start(replica, seq, table, num_cached, num_new, plan)
            budget -= num_new

    def _leave_for_another(
        self, replica: Replica, seq: Sequence, my_hits: int, now: float, spread: dict[int, int]
    ) -> bool:
        """True when ``seq`` should wait for a better replica than ``replica``: one that
        caches more of its prefix (prefix affinity; the score: blocks cached), or as much
        and runs fewer sequences (load spread; ``spread`` counts those this walk already
        left for it). That replica must be live, not draining and have room for ``seq``
        (free blocks for the whole of it, fewer than max_num_seqs running). The wait lasts
        at most ``affinity_wait_s`` from when ``seq`` was first passed over. Reads the
        other replicas' prefix indexes; changes none."""
        cfg = self.config
        wait = cfg.affinity_wait_s
        if wait <= 0 or len(self._replicas) < 2:
            return False
        since = seq.passed_over_at
        if since is not None and now - since >= wait:
            return False  # waited long enough: anyone takes it
        num_tokens = len(seq.token_ids)
        need = -(-num_tokens // cfg.block_size)
        cached = seq.request.uses_prefix_cache
        best, best_load, target = my_hits, len(replica.running), None
        for other in self._replicas.values():
            load = len(other.running) + spread.get(other.replica_id, 0)
            if other is replica or other.draining or load >= cfg.max_num_seqs:
                continue
            hits = other.blocks.lookup(seq.block_hashes, num_tokens) if cached else []
            if (len(hits), -load) <= (best, -best_load):
                continue  # neither more of the prefix, nor as much with less load
            ref_counts = other.blocks.ref_counts
            hits_now_free = sum(1 for b in hits if ref_counts[b] == 0)
            if need - len(hits) <= other.blocks.num_free_blocks - hits_now_free:
                best, best_load, target = len(hits), load, other
        if target is None:
            return False
        spread[target.replica_id] = spread.get(target.replica_id, 0) + 1
        if since is None:
            since = seq.passed_over_at = now
        until = since + wait
        if replica.deferred_until is None or until < replica.deferred_until:
            replica.deferred_until = until
        return True

    # -- reading -------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return sum(len(r.running) for r in self._replicas.values())

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    def sequence(self, request_id: str, index: int = 0, owner: str = "") -> Sequence:
        return self._requests[(owner, request_id)].sequences[index]

    @property
    def num_waiting_tokens(self) -> int:
        """Tokens of the waiting sequences (prompt, plus output already produced for the
        ones waiting to resume): what ``max_waiting_tokens`` bounds."""
        return self._waiting_tokens

    def stats(self) -> session_pb2.StatsResponse:
        """Queue lengths, per-replica load and prefix-cache hit rates."""
        queries = sum(r.blocks.queries for r in self._replicas.values())
        hits = sum(r.blocks.hits for r in self._replicas.values())
        return session_pb2.StatsResponse(
            num_waiting=self._num_waiting,
            num_running=self.num_running,
            num_waiting_tokens=self._waiting_tokens,
            prefix_cache_hit_rate=hits / queries if queries else 0.0,
            num_preemptions=self.num_preemptions,
            replicas=[
                session_pb2.ReplicaStats(
                    replica_id=r.replica_id,
                    epoch=r.epoch,
                    state=session_pb2.ReplicaStats.DRAINING
                    if r.draining
                    else session_pb2.ReplicaStats.ACTIVE,
                    num_running=len(r.running),
                    num_blocks=r.blocks.num_blocks,
                    num_free_blocks=r.blocks.num_free_blocks,
                    kv_usage=r.blocks.usage,
                    prefix_cache_hit_rate=r.blocks.hit_rate,
                    steps=r.step,
                )
                for r in self._replicas.values()
            ],
        )

    def check_invariants(self) -> None:
        """Raise AssertionError unless every structure agrees with every other (used by tests)."""
        cfg = self.config
        running_ids: set[int] = set()
        for r in self._replicas.values():
            r.blocks.check_invariants()
            assert len(r.running) <= cfg.max_num_seqs
            assert set(r.blocks.tables) == {s.seq_id for s in r.running}, "tables != running set"
            for seq in r.running:
                assert seq.status is Status.RUNNING and seq.replica_id == r.replica_id
                assert seq.num_computed_tokens <= len(seq.token_ids)
                assert len(r.blocks.tables[seq.seq_id]) * cfg.block_size >= seq.num_computed_tokens
                r.blocks.check_sequence(seq.seq_id, seq.block_hashes, seq.token_ids)
                running_ids.add(seq.seq_id)
        waiting = list(self._waiting_seqs())
        assert len(waiting) == len({s.seq_id for s in waiting}) == self._num_waiting
        assert sum(len(s.token_ids) for s in waiting) == self._waiting_tokens
        for seq in waiting:
            assert seq.replica_id is None and seq.num_computed_tokens == 0
        deadlines = {id(r) for _, _, r in self._deadlines}
        for request in self._requests.values():
            assert not request.deadline_unix_ms or id(request) in deadlines
        assert running_ids | {s.seq_id for s in waiting} == set(self._seqs), (
            "a live sequence is lost"
        )
        for seq in self._seqs.values():
            assert seq.status is not Status.FINISHED
            assert len(seq.token_ids) <= cfg.max_model_len
            if cfg.enable_prefix_caching:
                assert len(seq.block_hashes) == len(seq.token_ids) // cfg.block_size
        for key, request in self._requests.items():
            assert key == request.key
            live = sum(1 for s in request.sequences if s.status is not Status.FINISHED)
            assert live == request.num_unfinished > 0

    # -- internals -------------------------------------------------------------------

    def _push_waiting(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        seq.passed_over_at = None
        entry = seq.queue_entry = self._next_entry
        self._next_entry += 1
        heapq.heappush(self._waiting, (seq.sort_key, entry, seq))
        self._num_waiting += 1
        self._waiting_tokens += len(seq.token_ids)

    def _take_waiting(self, seq: Sequence) -> None:
        """Take a waiting sequence out of the queue (to admit it); its entry goes stale."""
        seq.queue_entry = 0
        self._num_waiting -= 1
        self._waiting_tokens -= len(seq.token_ids)
        waiting = self._waiting
        if waiting and waiting[0][2] is seq:
            heapq.heappop(waiting)

    def _peek_waiting(self) -> Sequence | None:
        waiting = self._waiting
        while waiting:
            _, entry, seq = waiting[0]
            if seq.status is Status.WAITING and seq.queue_entry == entry:
                return seq
            heapq.heappop(waiting)  # stale: aborted, or admitted from behind the head
        return None

    def _waiting_seqs(self) -> Iterator[Sequence]:
        """Every waiting sequence, in no particular order."""
        for _, entry, seq in self._waiting:
            if seq.status is Status.WAITING and seq.queue_entry == entry:
                yield seq

    def _in_queue_order(self) -> Iterator[Sequence]:
        """Waiting sequences in queue order, for admission: the heap's head while each one
        is taken; once one is left waiting (prefix affinity), a sorted copy of the rest."""
        while (seq := self._peek_waiting()) is not None:
            yield seq
            if seq.status is Status.WAITING:
                break
        else:
            return
        passed = seq
        for _, entry, later in sorted(self._waiting):
            live = later.status is Status.WAITING and later.queue_entry == entry
            if live and later is not passed:
                yield later

    def _push_deadline(self, request: Request) -> None:
        heap = self._deadlines
        if len(heap) > 64 and len(heap) > 2 * len(self._requests):
            # Mostly requests that ended before their deadline: drop those entries.
            requests = self._requests
            heap[:] = [e for e in heap if requests.get(e[2].key) is e[2]]
            heapq.heapify(heap)
        first = request.sequences[0].seq_id
        heapq.heappush(heap, (request.deadline_unix_ms, first, request))

    def _start(
        self,
        replica: Replica,
        seq: Sequence,
        table: list[int],
        num_cached: int,
        num_new: int,
        plan: step_pb2.StepPlan,
    ) -> None:
        """Bind an admitted sequence to the replica and describe it in the plan."""
        request = seq.request
        if request.seed is None:
            request.seed = self._rng.getrandbits(63)
        if not seq.admitted_once:
            seq.admitted_once = True
            seq.num_cached_tokens = min(num_cached, seq.num_prompt_tokens)
        seq.status = Status.RUNNING
        seq.replica_id = replica.replica_id
        seq.num_computed_tokens = num_cached + num_new
        replica.blocks.register(
            seq.seq_id, seq.block_hashes, seq.token_ids, seq.num_computed_tokens, request.extra_hash
        )
        replica.running.append(seq)
        new = plan.new_sequences.add(
            seq=seq.seq_id,
            token_ids=seq.token_ids,
            num_prompt_tokens=seq.num_prompt_tokens,
            seed=request.seed & _UINT64,
            sample_index=seq.index,
            block_ids=table,
            num_cached_tokens=num_cached,
            num_new_tokens=num_new,
            lora_id=request.lora_id,
        )
        new.sampling.CopyFrom(request.sampling)
        if request.structured_output is not None:
            new.structured_output.CopyFrom(request.structured_output)

    def _preempt(self, replica: Replica, seq: Sequence) -> None:
        """Take a running sequence off its replica (already removed from ``running``)."""
        replica.blocks.free(seq.seq_id)
        replica.pending_preempted.append(seq.seq_id)
        self.num_preemptions += 1
        self._requeue(seq)

    def _requeue(self, seq: Sequence) -> None:
        """Send a sequence back to the queue, keeping its tokens; it is recomputed on admission."""
        seq.replica_id = None
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self._push_waiting(seq)

    def _end(
        self,
        seq: Sequence,
        reason: int,
        stop_token_id: int | None = None,
        remove_from_running: bool = False,
    ) -> session_pb2.SequenceFinished:
        """Finish a sequence in any state and free what it holds; returns its final record."""
        if seq.status is Status.RUNNING:
            replica = self._replicas[seq.replica_id]
            replica.blocks.free(seq.seq_id)
            replica.pending_finished.append(seq.seq_id)
            if remove_from_running:
                replica.running.remove(seq)
        elif seq.status is Status.WAITING:
            self._num_waiting -= 1  # its heap entry is skipped later
            self._waiting_tokens -= len(seq.token_ids)
        seq.status = Status.FINISHED
        seq.replica_id = None
        del self._seqs[seq.seq_id]
        request = seq.request
        request.num_unfinished -= 1
        if request.num_unfinished == 0:
            del self._requests[request.key]
        return session_pb2.SequenceFinished(
            request_id=request.request_id,
            index=seq.index,
            reason=reason,
            stop_token_id=stop_token_id,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_generated_tokens=seq.num_output_tokens,
        )


def _sort_key(seq: Sequence) -> tuple[int, float, int]:
    return seq.sort_key


def _unsent_prompt_logprobs(
    seq: Sequence, entry: step_pb2.SequenceLogprobs
) -> list[common_pb2.TokenLogprobs]:
    """This step's prompt logprobs of ``seq`` for the positions it has not sent before.

    They end at the last prompt position computed in this step (the worker gives one per
    prompt token after the first, up to ``num_computed_tokens``). A sequence that was
    preempted or moved computes its prompt again from the start, and a client must get
    each position once.
    """
    positions = entry.positions
    last = min(seq.num_computed_tokens, seq.num_prompt_tokens - 1)
    first = last - len(positions) + 1
    skip = max(0, seq.num_prompt_logprobs_sent + 1 - first)
    seq.num_prompt_logprobs_sent = max(seq.num_prompt_logprobs_sent, last)
    return list(positions[skip:])
