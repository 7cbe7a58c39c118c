"""The reading end of the scheduler's prefix-cache events, for KV-aware routers.

The scheduler (``scheduler_svc.kv_events``) publishes every change to each replica's
prefix index as numbered ``KvEvent`` batches on a ZeroMQ PUB socket and answers
snapshot requests on a ROUTER socket (proto/pagoda/v1/kv_events.proto; the protocol
is in docs/prefix-cache.md). This module is the other end, torch-free and needing only
pyzmq and the generated messages, so that a router written in Python (or a test) can
use it without any of the scheduler's code:

- :class:`KvIndexMirror`, transport-free: every replica's index, rebuilt from a
  snapshot and the events after it.
- :class:`KvEventSubscriber`: the mirror kept in sync with a scheduler's two ports.

``BlockIndex`` and :func:`parents_first` describe an index the way the events do, on
both ends.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import zmq
from google.protobuf.message import DecodeError
from zmq.utils.monitor import parse_monitor_message

from pagoda.v1 import kv_events_pb2

log = logging.getLogger(__name__)

# hash -> (parent hash, b"" for a sequence's first block; the block's token ids)
BlockIndex: TypeAlias = dict[bytes, tuple[bytes, tuple[int, ...]]]


def parents_first(index: Mapping[bytes, tuple[bytes, tuple[int, ...]]]) -> list[bytes]:
    """The hashes of ``index`` ordered so that every parent in it comes before its children.

    The scheduler sends a snapshot's blocks, and a new replica's first events, in this
    order, so a subscriber that builds a tree (not just a dictionary) can insert them as
    they come. A block whose parent is not indexed (evicted while a child stayed, which
    happens when the child's sequence computed its own copy of the parent) is a root.
    """
    depth: dict[bytes, int] = {}
    for h in index:
        chain: list[bytes] = []
        node = h
        while node in index and node not in depth:
            chain.append(node)
            node = index[node][0]
        d = depth.get(node, -1)
        for link in reversed(chain):
            d += 1
            depth[link] = d
    return sorted(index, key=depth.__getitem__)


class KvIndexMirror:
    """Every replica's prefix index, rebuilt from a snapshot and the events after it.

    ``replicas[replica_id]`` maps each block hash to ``(parent hash, token ids)``; the
    parent is ``b""`` for a sequence's first block. ``sequence_number`` is the last
    event reflected, None until the first snapshot. An event at or below it is already
    in (an event can reach a subscriber after a snapshot that includes it: they travel
    on two sockets); one beyond the next number means events were lost, and then
    :meth:`apply` refuses the batch and the mirror waits for a new snapshot.
    ``applied`` counts the events applied, by kind.
    """

    def __init__(self) -> None:
        self.replicas: dict[int, BlockIndex] = {}
        self.block_sizes: dict[int, int] = {}
        self.sequence_number: int | None = None
        self.applied: Counter[str] = Counter()

    @property
    def in_sync(self) -> bool:
        return self.sequence_number is not None

    def invalidate(self) -> None:
        """Forget the position in the stream (events were lost); the next snapshot resyncs."""
        self.sequence_number = None

    def apply_snapshot(self, snapshot: kv_events_pb2.KvSnapshot) -> None:
        """Replace everything with the snapshot's indexes."""
        self.replicas = {}
        self.block_sizes = {}
        for replica in snapshot.replicas:
            self.block_sizes[replica.replica_id] = replica.block_size
            self.replicas[replica.replica_id] = {
                b.block_hash: (b.parent_hash, tuple(b.token_ids)) for b in replica.blocks
            }
        self.sequence_number = snapshot.sequence_number

    def apply(self, batch: kv_events_pb2.KvEventBatch) -> bool:
        """Apply the batch's new events; False (applying none of them) when some were lost."""
        seq = self.sequence_number
        if seq is None:
            return False
        fresh = [e for e in batch.events if e.sequence_number > seq]
        for offset, event in enumerate(fresh, seq + 1):
            if event.sequence_number != offset:
                self.invalidate()
                return False
        for event in fresh:
            self._apply_one(event)
        if fresh:
            self.sequence_number = fresh[-1].sequence_number
        return True

    def _apply_one(self, event: kv_events_pb2.KvEvent) -> None:
        rid = event.replica_id
        kind = event.WhichOneof("kind")
        self.applied[str(kind)] += 1
        if kind == "stored":
            s = event.stored
            self.replicas.setdefault(rid, {})[s.block_hash] = (s.parent_hash, tuple(s.token_ids))
            self.block_sizes[rid] = event.block_size
        elif kind == "removed":
            self.replicas.get(rid, {}).pop(event.removed.block_hash, None)
        elif kind == "cleared":
            self.replicas.pop(rid, None)
            self.block_sizes.pop(rid, None)

    def indexes(self) -> dict[int, BlockIndex]:
        """The non-empty indexes (a replica with nothing cached is left out)."""
        return {rid: index for rid, index in self.replicas.items() if index}


class KvEventSubscriber:
    """Keeps a :class:`KvIndexMirror` in sync with a scheduler's event and snapshot ports.

    Blocking and single-threaded: call :meth:`poll` in a loop. It subscribes first and
    asks for a snapshot only once the subscription is live (a first batch or heartbeat
    arrived: a snapshot asked for earlier could miss the events published before the
    subscription reached the scheduler), keeping what arrives meanwhile, then applies
    the snapshot and the kept batches after it. A gap in the sequence numbers, or a
    dropped connection (the scheduler restarted: its numbers start again at 1), makes it
    ask again. ``gaps`` counts how often that happened, ``snapshot_numbers`` lists the
    sequence numbers of the snapshots applied.
    """

    MAX_BUFFERED = 10_000

    def __init__(
        self,
        events_address: str,
        snapshot_address: str,
        *,
        snapshot_timeout_s: float = 5.0,
        context: zmq.Context | None = None,
    ):
        self.mirror = KvIndexMirror()
        self.gaps = 0
        self.snapshot_numbers: list[int] = []
        self._snapshot_address = snapshot_address
        self._timeout_s = snapshot_timeout_s
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._monitor = self._sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._sub.connect(events_address)
        self._req: zmq.Socket | None = None
        self._asked_at: float | None = None
        # Whether anything arrived on the events socket since it (re)connected.
        self._received = False
        self._buffer: list[kv_events_pb2.KvEventBatch] = []
        self._poller = zmq.Poller()
        self._poller.register(self._sub, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def poll(self, timeout_s: float) -> None:
        """Receive and apply what arrives for up to ``timeout_s`` seconds (0: what is there)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._maybe_ask()
            left = max(0.0, deadline - time.monotonic())
            ready = dict(self._poller.poll(min(left, 0.05) * 1000))
            # A dropped connection first: what arrives after it is from a new connection.
            if self._monitor in ready:
                while (frames := _recv(self._monitor)) is not None:
                    self._on_monitor(parse_monitor_message(frames))
            if self._sub in ready:
                while (frames := _recv(self._sub)) is not None:
                    self._on_batch(frames[-1])
            req = self._req
            if req is not None and req in ready and (frames := _recv(req)) is not None:
                self._on_snapshot(frames[-1])
            if time.monotonic() >= deadline:
                return

    def poll_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Poll until ``predicate()`` holds or the timeout passes; returns the predicate."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.poll(min(left, 0.02))
        return True

    def close(self) -> None:
        self._sub.disable_monitor()
        for sock in (self._sub, self._monitor, self._req):
            if sock is not None:
                sock.close(linger=0)
        if self._own_ctx:
            self._ctx.term()

    def _on_batch(self, payload: bytes) -> None:
        try:
            batch = kv_events_pb2.KvEventBatch.FromString(payload)
        except DecodeError:
            log.warning("dropping an undecodable event batch")
            return
        self._received = True
        if not batch.events:  # a heartbeat
            return
        if self.mirror.in_sync:
            if self.mirror.apply(batch):
                return
            self.gaps += 1
        if len(self._buffer) >= self.MAX_BUFFERED:
            del self._buffer[0]  # the snapshot will show the gap, and we ask again
        self._buffer.append(batch)

    def _on_snapshot(self, payload: bytes) -> None:
        self._asked_at = None
        snapshot = kv_events_pb2.KvSnapshot.FromString(payload)
        self.snapshot_numbers.append(snapshot.sequence_number)
        self.mirror.apply_snapshot(snapshot)
        buffered, self._buffer = self._buffer, []
        for i, batch in enumerate(buffered):
            if not self.mirror.apply(batch):
                self.gaps += 1
                self._buffer = buffered[i:]
                return

    def _on_monitor(self, event: dict[str, Any]) -> None:
        if event["event"] == zmq.EVENT_DISCONNECTED:
            # What was published while disconnected is lost (or the scheduler restarted,
            # and an answer still on its way would describe the old one).
            self.mirror.invalidate()
            self._close_req()
            self._buffer.clear()
            self._received = False

    def _maybe_ask(self) -> None:
        if self.mirror.in_sync:
            return
        now = time.monotonic()
        if self._asked_at is not None:
            if now - self._asked_at < self._timeout_s:
                return
            self._close_req()  # the answer is lost; a new socket forgets the old request
        if not self._received:
            return
        if self._req is None:
            self._req = self._ctx.socket(zmq.DEALER)
            self._req.setsockopt(zmq.LINGER, 0)
            self._req.connect(self._snapshot_address)
            self._poller.register(self._req, zmq.POLLIN)
        request = kv_events_pb2.KvSnapshotRequest().SerializeToString()
        self._req.send_multipart([b"", request])
        self._asked_at = now

    def _close_req(self) -> None:
        if self._req is not None:
            self._poller.unregister(self._req)
            self._req.close(linger=0)
            self._req = None
        self._asked_at = None


def _recv(sock: zmq.Socket) -> list[bytes] | None:
    """One waiting message's frames, or None when nothing is waiting."""
    try:
        return sock.recv_multipart(zmq.NOBLOCK)
    except zmq.Again:
        return None
