"""One replica as the scheduler core sees it: its blocks, its running batch, its steps.

(The service's handle on a replica, with its worker's socket and liveness, is
``replicas.py``.) The running half of a step is the replica's own business: each
running sequence moves ``num_computed_tokens`` toward its length within the step's
token budget, and when the replica's blocks run out, its sequence with the largest
sort key (the latest arrival, or the lowest priority) is preempted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.v1 import step_pb2
from scheduler_svc.block_manager import BlockManager
from scheduler_svc.sequence import Sequence, Status

# What a step grants a running sequence: its new tokens, and the blocks added for them.
Grant = tuple[int, list[int]]


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

    def schedule_running(self, budget: int) -> tuple[dict[Sequence, Grant], int, list[Sequence]]:
        """Spend ``budget`` tokens on the running sequences in admission order: a decode
        costs one, an unfinished prefill continues. When blocks run out, preempt the
        largest sort key until the allocation fits or the sequence itself is the victim.
        Returns each scheduled sequence's grant, the budget left, and the sequences
        preempted (off the replica, for the caller to send back to the queue)."""
        blocks = self.blocks
        running = self.running
        scheduled: dict[Sequence, Grant] = {}
        preempted: list[Sequence] = []
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
                blocks.free(victim.seq_id)
                self.pending_preempted.append(victim.seq_id)
                preempted.append(victim)
                if victim is seq:
                    break
                if victim_pos < i:
                    i -= 1
                    undone = scheduled.pop(victim, None)
                    if undone is not None:  # scheduled in this step: its tokens come back
                        budget += undone[0]
                new_blocks = blocks.grow(seq.seq_id, seq.num_computed_tokens + num_new)
            if new_blocks is None:  # seq itself was the victim; running[i] is now the next one
                continue
            scheduled[seq] = (num_new, new_blocks)
            budget -= num_new
            i += 1
        return scheduled, budget, preempted

    def advance(self, scheduled: dict[Sequence, Grant], plan: step_pb2.StepPlan) -> None:
        """Move the scheduled sequences' computed tokens on, register the blocks they fill
        in the prefix index, and put them in the plan."""
        blocks = self.blocks
        bs = blocks.block_size
        running_ids = []
        running_new = []
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
        plan.running_seqs.extend(running_ids)
        plan.running_num_new_tokens.extend(running_new)

    def check_invariants(self, max_num_seqs: int) -> None:
        """Raise AssertionError unless the running set, the block tables and the prefix
        index agree."""
        blocks = self.blocks
        blocks.check_invariants()
        assert len(self.running) <= max_num_seqs
        assert set(blocks.tables) == {s.seq_id for s in self.running}, "tables != running set"
        for seq in self.running:
            assert seq.status is Status.RUNNING and seq.replica_id == self.replica_id
            assert seq.num_computed_tokens <= len(seq.token_ids)
            assert len(blocks.tables[seq.seq_id]) * blocks.block_size >= seq.num_computed_tokens
            blocks.check_sequence(seq.seq_id, seq.block_hashes, seq.token_ids)


def _sort_key(seq: Sequence) -> tuple[int, float, int]:
    return seq.sort_key
