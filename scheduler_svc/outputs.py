"""The messages the scheduler core hands out: step outputs, final records and stats.

``update`` fills one ``OwnerOutputs`` per owner (a gateway session) column by column,
so that a step that advances many sequences makes one StepOutputs per owner rather
than one message per token.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from pagoda.v1 import common_pb2, session_pb2, step_pb2
from scheduler_svc.replica import Replica
from scheduler_svc.request_queue import RequestQueue
from scheduler_svc.sequence import Sequence


@dataclass(slots=True)
class OwnerOutputs:
    """The columns of one owner's StepOutputs, filled during ``update``."""

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


def prompt_logprobs(
    result: step_pb2.StepResult, seqs: Mapping[int, Sequence]
) -> defaultdict[str, OwnerOutputs]:
    """The owners' outputs of a step (an owner's appear when first indexed), started with
    its prompt logprobs (of the sequences still on the replica that computed them)."""
    outputs: defaultdict[str, OwnerOutputs] = defaultdict(OwnerOutputs)
    for entry in result.prompt_logprobs:
        seq = seqs.get(entry.seq)
        if seq is None or seq.replica_id != result.replica_id:
            continue
        positions = _unsent_prompt_logprobs(seq, entry)
        if positions:
            outputs[seq.request.owner].logprobs.append(
                session_pb2.DeltaLogprobs(
                    request_id=seq.request.request_id, index=seq.index, prompt=positions
                )
            )
    return outputs


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


def finished_record(
    seq: Sequence, reason: int, stop_token_id: int | None = None
) -> session_pb2.SequenceFinished:
    """The final record of a sequence that has just ended."""
    return session_pb2.SequenceFinished(
        request_id=seq.request.request_id,
        index=seq.index,
        reason=reason,
        stop_token_id=stop_token_id,
        num_prompt_tokens=seq.num_prompt_tokens,
        num_cached_tokens=seq.num_cached_tokens,
        num_generated_tokens=seq.num_output_tokens,
    )


def stats_response(
    replicas: Collection[Replica], queue: RequestQueue, num_preemptions: int
) -> session_pb2.StatsResponse:
    """Queue lengths, per-replica load and prefix-cache hit rates."""
    queries = sum(r.blocks.queries for r in replicas)
    hits = sum(r.blocks.hits for r in replicas)
    return session_pb2.StatsResponse(
        num_waiting=queue.num_seqs,
        num_running=sum(len(r.running) for r in replicas),
        num_waiting_tokens=queue.num_tokens,
        prefix_cache_hit_rate=hits / queries if queries else 0.0,
        num_preemptions=num_preemptions,
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
            for r in replicas
        ],
    )
