"""The replicas the service knows: live ones, draining ones, and the dead (kept for Stats).

The core knows only live replicas (``Scheduler.join`` / ``leave``), a draining one
among them while it runs what it holds; operators also want to see which replicas
drained or died, so the service keeps a handle per registration and lists it after it
left the core: a drained one until its heartbeats stop, a dead one among the last
``MAX_DEAD`` deaths.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pagoda.v1 import session_pb2

ACTIVE = session_pb2.ReplicaStats.ACTIVE
DRAINING = session_pb2.ReplicaStats.DRAINING
DEAD = session_pb2.ReplicaStats.DEAD
STATE_NAMES = {ACTIVE: "ACTIVE", DRAINING: "DRAINING", DEAD: "DEAD"}

# Dead replicas listed in Stats; older deaths are forgotten so the list stays bounded.
MAX_DEAD = 32


@dataclass(eq=False)
class ReplicaHandle:
    """One registration of one worker: where to send its plans and how it is doing."""

    replica_id: int
    epoch: int
    worker_id: str
    # The ZeroMQ routing identity of the worker's main socket (plans, Welcome, Reset).
    identity: bytes
    num_blocks: int
    device: str
    last_seen: float
    state: int = ACTIVE
    steps: int = 0
    # Set whenever the replica may have something to schedule (submit, abort, join...).
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    # The result of the plan in flight, and when that plan was sent.
    pending: asyncio.Future[object] | None = None
    step_in_flight: int = 0
    step_started: float | None = None
    ended_at: float | None = None
    # While draining with a grace period: when the scheduler takes it out regardless.
    drain_deadline: float | None = None


@dataclass
class ReplicaTable:
    """Every handle by replica id and by worker id, and the subset the core runs."""

    # In the core: taking work (ACTIVE), or DRAINING and still running what it holds.
    live: dict[int, ReplicaHandle] = field(default_factory=dict)
    listed: dict[int, ReplicaHandle] = field(default_factory=dict)
    # The latest registration of each worker, whatever its state.
    by_worker: dict[str, ReplicaHandle] = field(default_factory=dict)

    def add(self, handle: ReplicaHandle) -> None:
        self.live[handle.replica_id] = handle
        self.listed[handle.replica_id] = handle
        self.by_worker[handle.worker_id] = handle

    def end(self, handle: ReplicaHandle, state: int | None, now: float) -> None:
        """Take a handle out of the live set; ``state`` None forgets it altogether (a reset
        replica, whose worker registers again as a new one)."""
        self.live.pop(handle.replica_id, None)
        handle.ended_at = now
        if state is None:
            self.listed.pop(handle.replica_id, None)
            if self.by_worker.get(handle.worker_id) is handle:
                del self.by_worker[handle.worker_id]
            return
        handle.state = state
        if state == DEAD:
            dead = [h for h in self.listed.values() if h.state == DEAD]
            for old in dead[: max(0, len(dead) - MAX_DEAD)]:
                del self.listed[old.replica_id]

    def prune(self, now: float, silence_s: float) -> None:
        """Forget draining replicas whose worker has gone quiet (it exited, as announced)."""
        for handle in list(self.listed.values()):
            if handle.replica_id in self.live:
                continue
            if handle.state == DRAINING and now - handle.last_seen > silence_s:
                del self.listed[handle.replica_id]
                if self.by_worker.get(handle.worker_id) is handle:
                    del self.by_worker[handle.worker_id]

    def merge_into(self, stats: session_pb2.StatsResponse) -> None:
        """Replace the core's replica list (live ones only) by every listed replica."""
        live = {r.replica_id: r for r in stats.replicas}
        entries = []
        for rid in sorted(self.listed):
            handle = self.listed[rid]
            entry = live.get(rid) if rid in self.live else None
            if entry is None:
                entry = session_pb2.ReplicaStats(
                    replica_id=rid,
                    epoch=handle.epoch,
                    state=handle.state,
                    num_blocks=handle.num_blocks,
                    num_free_blocks=handle.num_blocks,
                    steps=handle.steps,
                )
            entries.append(entry)
        del stats.replicas[:]
        stats.replicas.extend(entries)
