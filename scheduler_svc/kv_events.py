"""Prefix-cache events for KV-aware routers: a ZeroMQ PUB stream and a snapshot port.

An external router that wants to send a request where its prefix is already cached
needs every replica's prefix index. The scheduler publishes each change to it as a
``KvEvent`` (proto/pagoda/v1/kv_events.proto): ``stored`` when a full block is
indexed under its hash, ``removed`` when a hash leaves the index because its block
was taken for new content, ``cleared`` when a replica's whole index is dropped (it
left, or was reset). One global ``sequence_number`` counts the events of all
replicas, with no gap, so a subscriber knows when it missed one; a subscriber that
joins late (or missed one) asks the snapshot port for every index at one point of the
stream and applies the events that follow it. docs/prefix-cache.md describes the wire
format and the protocol.

This is the publishing end, in two layers so each can be tested on its own:

- :class:`KvEventRecorder`, transport-free: listens to the core's block managers and
  turns their changes into numbered ``KvEventBatch`` messages and ``KvSnapshot``s.
- :class:`KvEventPublisher`: the recorder on the service's event loop, behind a PUB
  socket and a ROUTER socket.

The reading end (``KvIndexMirror``, ``KvEventSubscriber``) is ``pagoda.kv_events``,
beside the messages it reads, so that a router needs none of the scheduler's code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

import zmq
import zmq.asyncio
from google.protobuf.message import DecodeError

from pagoda.kv_events import BlockIndex, parents_first
from pagoda.v1 import kv_events_pb2
from scheduler_svc.block_hash import ROOT_PARENT
from scheduler_svc.block_manager import BLOCK_REMOVED, BLOCK_STORED, BlockManager, CachedBlock

if TYPE_CHECKING:
    from scheduler_svc.scheduler import Scheduler

log = logging.getLogger(__name__)

_CLEARED = 3
# How often the publisher looks for replicas that joined or left while no block changed.
WATCH_S = 0.1
# After this long without a batch the publisher sends an empty one (a heartbeat): it tells
# a new subscriber that its subscription is live, so that a snapshot it asks for next is
# followed by every later event.
HEARTBEAT_S = 1.0

# (replica, block size, kind, hash, parent hash, token ids): an event not numbered yet.
_Pending: TypeAlias = tuple[int, int, int, bytes, bytes, tuple[int, ...]]


def block_index(blocks: BlockManager) -> BlockIndex:
    """A block manager's prefix index in the form the events describe it."""
    return {h: _published(c) for h, c in blocks.cached_blocks().items()}


def core_indexes(core: Scheduler) -> dict[int, BlockIndex]:
    """The core's non-empty indexes by replica: what a ``KvIndexMirror`` must equal."""
    out = {rid: block_index(core.replica(rid).blocks) for rid in core.replica_ids}
    return {rid: index for rid, index in out.items() if index}


def _published(content: CachedBlock) -> tuple[bytes, tuple[int, ...]]:
    # The hash chain starts from 32 zero bytes; on the wire a first block has no parent.
    return (b"" if content.parent == ROOT_PARENT else content.parent, content.token_ids)


class KvEventRecorder:
    """Numbers the prefix-index changes of every replica of one ``Scheduler``.

    It never changes the core: it finds the block managers through the core's public
    ``replica_ids`` / ``replica()`` and sets their ``listener``. A replica that joined
    since the last :meth:`sync` is described by ``stored`` events for what its index
    already holds (so nothing done before it was seen is lost); one whose block manager
    is gone or was replaced (``leave``, ``reset``) gets ``cleared``. Call :meth:`sync`
    (``take`` does) whenever membership may have changed; the core is only ever touched
    from one thread, and so is this.

    ``on_pending`` is called when a change arrives and nothing was pending, so that the
    owner can schedule one ``take`` for everything one step changes.
    """

    def __init__(self, core: Scheduler, on_pending: Callable[[], None] | None = None):
        self._core = core
        self._on_pending = on_pending
        self._attached: dict[int, BlockManager] = {}
        self._pending: list[_Pending] = []
        # The last number given out: 0 before the first event.
        self.sequence_number = 0

    def sync(self) -> None:
        """Clear the replicas whose block manager is gone and catch up with new ones."""
        core = self._core
        current = {rid: core.replica(rid).blocks for rid in core.replica_ids}
        attached = self._attached
        for rid, blocks in list(attached.items()):
            if current.get(rid) is not blocks:
                blocks.listener = None
                del attached[rid]
                self._pending.append((rid, blocks.block_size, _CLEARED, b"", b"", ()))
        for rid, blocks in current.items():
            if rid not in attached:
                self._attach(rid, blocks)

    def take(self) -> kv_events_pb2.KvEventBatch | None:
        """Number every pending event and return them as one batch (None when there are none)."""
        self.sync()
        pending = self._pending
        if not pending:
            return None
        batch = kv_events_pb2.KvEventBatch()
        add = batch.events.add
        seq = self.sequence_number
        for rid, block_size, kind, block_hash, parent, token_ids in pending:
            seq += 1
            event = add(sequence_number=seq, replica_id=rid, block_size=block_size)
            if kind == BLOCK_STORED:
                stored = event.stored
                stored.block_hash = block_hash
                stored.parent_hash = parent
                stored.token_ids.extend(token_ids)
            elif kind == BLOCK_REMOVED:
                event.removed.block_hash = block_hash
            else:
                event.cleared.SetInParent()
        self.sequence_number = seq
        pending.clear()
        return batch

    def snapshot(self) -> kv_events_pb2.KvSnapshot:
        """Every replica's index as of ``sequence_number``; :meth:`take` must have just run.

        Replicas come in id order, each one's blocks parents first.
        """
        if self._pending:
            raise RuntimeError("take() the pending events before a snapshot")
        snapshot = kv_events_pb2.KvSnapshot(sequence_number=self.sequence_number)
        for rid in sorted(self._attached):
            blocks = self._attached[rid]
            replica = snapshot.replicas.add(replica_id=rid, block_size=blocks.block_size)
            index = block_index(blocks)
            add = replica.blocks.add
            for h in parents_first(index):
                parent, token_ids = index[h]
                add(block_hash=h, parent_hash=parent, token_ids=token_ids)
        return snapshot

    def detach(self) -> None:
        """Stop listening to every block manager (the publisher is closing)."""
        for blocks in self._attached.values():
            blocks.listener = None
        self._attached.clear()

    def _attach(self, rid: int, blocks: BlockManager) -> None:
        pending = self._pending
        block_size = blocks.block_size
        index = block_index(blocks)
        for h in parents_first(index):
            parent, token_ids = index[h]
            pending.append((rid, block_size, BLOCK_STORED, h, parent, token_ids))
        on_pending = self._on_pending

        def listener(
            kind: int, block_hash: bytes, parent: bytes, token_ids: tuple[int, ...]
        ) -> None:
            if not pending and on_pending is not None:
                on_pending()
            pending.append((rid, block_size, kind, block_hash, parent, token_ids))

        blocks.listener = listener
        self._attached[rid] = blocks


class KvEventPublisher:
    """The recorder behind a ZeroMQ PUB socket (events) and a ROUTER socket (snapshots).

    Everything runs on the service's event loop, as the core does: the changes one
    loop callback makes (in practice one replica's ``schedule``) go out as one batch
    right after it, and a snapshot is taken between two callbacks, after publishing
    what was pending, so it reflects exactly the events up to its sequence number.
    A replica that leaves is ``cleared`` right after the callback that ended it
    (``changed``); a watch task catches anything else that changed while nothing
    moved, and sends an empty batch after ``HEARTBEAT_S`` without any.
    """

    def __init__(self, core: Scheduler, host: str, events_port: int, snapshot_port: int):
        self.recorder = KvEventRecorder(core, self._schedule_flush)
        self._host = host
        self._ports = (events_port, snapshot_port)
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._actx = zmq.asyncio.Context.shadow(self._ctx)
        self._router = self._actx.socket(zmq.ROUTER)
        # A requester that vanished before its answer is an error to log, not a silent drop.
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.LINGER, 0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        self._last_sent = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        if not core.config.enable_prefix_caching:
            log.warning("prefix caching is off: the prefix-cache event stream stays empty")

    @property
    def sequence_number(self) -> int:
        """The number of the last event published."""
        return self.recorder.sequence_number

    def bind(self) -> tuple[int, int]:
        """Bind both sockets on the host; returns the (events, snapshot) ports they got."""
        host = self._host.strip("[]")
        if ":" in host:
            host = f"[{host}]"
            for sock in (self._pub, self._router):
                sock.setsockopt(zmq.IPV6, 1)
        ports = []
        for sock, port in zip((self._pub, self._router), self._ports, strict=True):
            sock.bind(f"tcp://{host}:{port if port else '*'}")
            ports.append(int(sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1]))
        return ports[0], ports[1]

    def start(self) -> None:
        """Start answering snapshots and watching membership (on the running loop)."""
        self._loop = asyncio.get_running_loop()
        self.flush()
        self._tasks = [
            asyncio.create_task(self._serve_snapshots(), name="kv-snapshots"),
            asyncio.create_task(self._watch(), name="kv-watch"),
        ]

    async def close(self) -> None:
        """Publish what is pending, stop the tasks and close the sockets."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._loop is not None:
            self.flush()
        self.recorder.detach()
        self._router.close(linger=0)
        self._pub.close(linger=0)
        self._ctx.term()

    def flush(self) -> None:
        """Publish the pending events (and membership changes) as one batch."""
        self._flush_scheduled = False
        if self._pub.closed:
            return
        batch = self.recorder.take()
        if batch is not None:
            # A PUB socket never blocks: a subscriber past its high-water mark loses
            # messages, sees the gap in the sequence numbers and asks for a snapshot.
            self._send(batch.SerializeToString())

    def changed(self) -> None:
        """Membership changed (a replica left): publish its ``cleared`` right after this
        loop callback, as a step's events are, rather than at the next watch tick."""
        self._schedule_flush()

    def snapshot(self) -> kv_events_pb2.KvSnapshot:
        """Publish what is pending, then every replica's index at that sequence number."""
        self.flush()
        return self.recorder.snapshot()

    def _send(self, data: bytes) -> None:
        self._pub.send(data, zmq.NOBLOCK)
        self._last_sent = time.monotonic()

    def _schedule_flush(self) -> None:
        if self._flush_scheduled or self._loop is None:
            return
        self._flush_scheduled = True
        self._loop.call_soon(self.flush)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            self.flush()
            if time.monotonic() - self._last_sent >= HEARTBEAT_S:
                self._send(kv_events_pb2.KvEventBatch().SerializeToString())

    async def _serve_snapshots(self) -> None:
        sock = self._router
        while True:
            frames = await sock.recv_multipart()
            # [identity, (empty delimiter from a REQ socket,) request]: answer on the same
            # envelope, so REQ and DEALER clients both work.
            if len(frames) < 2:
                continue
            try:
                kv_events_pb2.KvSnapshotRequest.FromString(frames[-1])
            except DecodeError:
                log.warning("dropping an undecodable snapshot request from %r", frames[0])
                continue
            try:
                data = self.snapshot().SerializeToString()
                await sock.send_multipart(frames[:-1] + [data], flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.debug("could not answer a snapshot request from %r: %s", frames[0], exc)
            except Exception:  # one bad request must not stop the snapshot port
                log.exception("failed to answer a snapshot request")
