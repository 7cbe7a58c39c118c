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

This class holds the state and the step; the parts it is made of each have their file:
``intake.py`` (a Submit checked and made sequences), ``request_queue.py`` (the waiting
queue and its bounds, the deadlines), ``replica.py`` (a replica's blocks and running
batch), ``routing.py`` (prefix affinity and load spread) and ``outputs.py`` (the
messages handed out).
"""

from __future__ import annotations

import random

from pagoda.v1 import session_pb2, step_pb2
from scheduler_svc.block_hash import extend_hashes
from scheduler_svc.block_manager import BlockManager
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.intake import Intake
from scheduler_svc.outputs import finished_record, prompt_logprobs, stats_response
from scheduler_svc.replica import Replica
from scheduler_svc.request_queue import Deadlines, QueueFull, RequestQueue
from scheduler_svc.routing import Router
from scheduler_svc.sequence import ABORT, STOP, Request, Sequence, Status, stop_reason

__all__ = ["QueueFull", "Replica", "Scheduler"]

_UINT64 = 2**64 - 1


class Scheduler:
    """Continuous batching over any number of replicas, with one global waiting queue."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self._replicas: dict[int, Replica] = {}
        self._requests: dict[tuple[str, str], Request] = {}
        self._seqs: dict[int, Sequence] = {}  # every unfinished sequence, by handle
        self._queue = RequestQueue(
            config.policy, config.max_waiting_requests, config.max_waiting_tokens
        )
        self._deadlines = Deadlines(self._requests)
        self._intake = Intake(config, self._queue)
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
        request = self._intake.request(submit, now, owner, self._requests)
        for seq in request.sequences:
            self._seqs[seq.seq_id] = seq
            self._queue.push(seq)
        self._requests[request.key] = request
        if request.deadline_unix_ms:
            self._deadlines.push(request)

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
        for seq in list(self._queue):
            if not seq.admitted_once:
                records.setdefault(seq.request.owner, []).append(self._end(seq, ABORT))
        return records

    def expire(self, now_unix_ms: int) -> dict[str, list[session_pb2.SequenceFinished]]:
        """End every request whose deadline has passed, waiting or running (reason "abort");
        returns their final records by owner. The caller passes wall-clock time, since a
        deadline is a Unix time."""
        records: dict[str, list[session_pb2.SequenceFinished]] = {}
        for request in self._deadlines.due(now_unix_ms):
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
        plan = step_pb2.StepPlan(replica_id=replica_id, epoch=replica.epoch)
        # Running sequences first: each decode costs one token, an unfinished prefill continues.
        scheduled, budget, preempted = replica.schedule_running(self.config.max_num_batched_tokens)
        self.num_preemptions += len(preempted)
        for seq in preempted:
            self._requeue(seq)
        replica.advance(scheduled, plan)
        # Then waiting sequences from the head of the global queue, while budget and blocks
        # last. A step that had to preempt admits nothing: the pool is already too small.
        # Nor does a draining replica.
        replica.deferred_until = None
        if not preempted and not replica.draining:
            self._admit(replica, budget, plan, now)
        if not (
            scheduled or plan.new_sequences or replica.pending_finished or replica.pending_preempted
        ):
            return None
        replica.step += 1
        plan.step = replica.step
        plan.finished_seqs.extend(replica.pending_finished)
        plan.preempted_seqs.extend(replica.pending_preempted)
        replica.pending_finished.clear()
        replica.pending_preempted.clear()
        return plan

    def _admit(self, replica: Replica, budget: int, plan: step_pb2.StepPlan, now: float) -> None:
        """Admit waiting sequences in queue order while the budget, ``max_num_seqs`` and the
        blocks last. One that does not fit stops admission (the queue order holds); one left
        for a better replica (prefix affinity, load spread) keeps its place, and the next
        one behind it may be admitted."""
        cfg = self.config
        bs = cfg.block_size
        blocks = replica.blocks
        running = replica.running
        router = Router(cfg, replica, self._replicas.values(), now)
        for seq in self._queue.in_order():
            if budget <= 0 or len(running) >= cfg.max_num_seqs:
                break
            num_tokens = len(seq.token_ids)
            if seq.request.uses_prefix_cache:
                hits = blocks.lookup(seq.block_hashes, num_tokens)
                num_queried = min(len(seq.block_hashes), (num_tokens - 1) // bs)
            else:
                hits, num_queried = [], 0
            if router.leave_for_another(seq, len(hits)):
                if router.done:
                    break
                continue
            num_cached = len(hits) * bs
            num_new = min(num_tokens - num_cached, budget)
            table = blocks.admit(seq.seq_id, hits, num_cached + num_new, num_queried)
            if table is None:
                break
            self._queue.take(seq)
            self._start(replica, seq, table, num_cached, num_new, plan)
            budget -= num_new

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
        seqs = self._seqs
        outputs = prompt_logprobs(result, seqs)
        replica_id = replica.replica_id
        cfg = self.config
        bs = cfg.block_size
        max_len = cfg.max_model_len
        hashing = cfg.enable_prefix_caching
        eos = self._eos
        token_logprobs = {e.seq: e.positions for e in result.logprobs} if result.logprobs else None
        any_finished = False
        for seq_id, token in zip(result.seqs, result.token_ids, strict=True):
            seq = seqs.get(seq_id)
            if seq is None or seq.replica_id != replica_id:
                continue
            tokens = seq.token_ids
            if seq.num_computed_tokens != len(tokens):
                continue
            request = seq.request
            tokens.append(token)
            if hashing and len(tokens) % bs == 0:
                extend_hashes(seq.block_hashes, tokens, bs, request.extra_hash)
            out = outputs[request.owner]
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
            reason = stop_reason(seq, token, eos, max_len)
            if reason is not None:
                stop_token_id = token if reason == STOP else None
                out.finished.append(self._end(seq, reason, stop_token_id=stop_token_id))
                any_finished = True
        if any_finished:
            replica.running = [s for s in replica.running if s.status is Status.RUNNING]
        return {owner: out.build() for owner, out in outputs.items()}

    # -- reading -------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return self._queue.num_seqs

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
        return self._queue.num_tokens

    def stats(self) -> session_pb2.StatsResponse:
        """Queue lengths, per-replica load and prefix-cache hit rates."""
        return stats_response(self._replicas.values(), self._queue, self.num_preemptions)

    def check_invariants(self) -> None:
        """Raise AssertionError unless every structure agrees with every other (used by tests)."""
        cfg = self.config
        running_ids: set[int] = set()
        for r in self._replicas.values():
            r.check_invariants(cfg.max_num_seqs)
            running_ids.update(s.seq_id for s in r.running)
        self._queue.check_invariants()
        self._deadlines.check_invariants()
        assert running_ids | {s.seq_id for s in self._queue} == set(self._seqs), (
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

    def _requeue(self, seq: Sequence) -> None:
        """Send a sequence back to the queue, keeping its tokens; it is recomputed on admission."""
        seq.replica_id = None
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self._queue.push(seq)

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
            self._queue.discard(seq)
        seq.status = Status.FINISHED
        seq.replica_id = None
        del self._seqs[seq.seq_id]
        request = seq.request
        request.num_unfinished -= 1
        if request.num_unfinished == 0:
            del self._requests[request.key]
        return finished_record(seq, reason, stop_token_id)
