"""Which replica admits a waiting sequence: prefix affinity and load spread.

Admission is work-conserving: whichever replica is scheduled takes the head of the
queue, unless a better replica has room for it. Better means its prefix index holds
more of the sequence's full prompt blocks (prefix affinity), or as many while it runs
fewer sequences (load spread). The sequence keeps its place in the queue, and waits
for that replica at most ``affinity_wait_s`` from when it was first passed over;
docs/scheduler.md.
"""

from __future__ import annotations

from collections.abc import Collection

from scheduler_svc.config import SchedulerConfig
from scheduler_svc.replica import Replica
from scheduler_svc.sequence import Sequence

# A replica's admission looks at most this many requests left for other replicas (prefix
# affinity, load spread) in one step before it stops admitting: the walk stays short.
AFFINITY_LOOKAHEAD = 64


class Router:
    """One admission walk of one replica: which sequences it leaves for another one.

    Sequences it has left for each other replica count as that replica's load, so
    that a burst on idle replicas splits evenly instead of all going to the second
    one. Reads the other replicas' prefix indexes; changes none.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        replica: Replica,
        replicas: Collection[Replica],
        now: float,
    ):
        self.config = config
        self.replica = replica
        self.replicas = replicas
        self.now = now
        self.enabled = config.affinity_wait_s > 0 and len(replicas) >= 2
        self.num_passed = 0
        self.spread: dict[int, int] = {}

    @property
    def done(self) -> bool:
        """The walk has passed over AFFINITY_LOOKAHEAD sequences: it admits no more."""
        return self.num_passed >= AFFINITY_LOOKAHEAD

    def leave_for_another(self, seq: Sequence, my_hits: int) -> bool:
        """True when ``seq`` should wait for a better replica than this walk's, one that
        is live, not draining and has room for it (free blocks for the whole of it,
        fewer than max_num_seqs running); ``my_hits``: the blocks of it cached here."""
        if not self.enabled:
            return False
        wait = self.config.affinity_wait_s
        since = seq.passed_over_at
        if since is not None and self.now - since >= wait:
            return False  # waited long enough: anyone takes it
        target = self._better_replica(seq, my_hits)
        if target is None:
            return False
        self.spread[target.replica_id] = self.spread.get(target.replica_id, 0) + 1
        self.num_passed += 1
        if since is None:
            since = seq.passed_over_at = self.now
        until = since + wait
        replica = self.replica
        if replica.deferred_until is None or until < replica.deferred_until:
            replica.deferred_until = until
        return True

    def _better_replica(self, seq: Sequence, my_hits: int) -> Replica | None:
        """The replica with room that scores best for ``seq`` (blocks cached, then the
        lowest load), if it beats this walk's own."""
        cfg = self.config
        num_tokens = len(seq.token_ids)
        need = -(-num_tokens // cfg.block_size)
        cached = seq.request.uses_prefix_cache
        best, best_load, target = my_hits, len(self.replica.running), None
        for other in self.replicas:
            load = len(other.running) + self.spread.get(other.replica_id, 0)
            if other is self.replica or other.draining or load >= cfg.max_num_seqs:
                continue
            hits = other.blocks.lookup(seq.block_hashes, num_tokens) if cached else []
            if (len(hits), -load) <= (best, -best_load):
                continue  # neither more of the prefix, nor as much with less load
            ref_counts = other.blocks.ref_counts
            hits_now_free = sum(1 for b in hits if ref_counts[b] == 0)
            if need - len(hits) <= other.blocks.num_free_blocks - hits_now_free:
                best, best_load, target = len(hits), load, other
        return target
