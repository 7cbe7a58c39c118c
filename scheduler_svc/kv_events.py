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

Three layers, so each can be tested and reused on its own:

- :class:`KvEventRecorder`, transport-free: listens to the core's block managers and
  turns their changes into numbered ``KvEventBatch`` messages and ``KvSnapshot``s.
- :class:`KvEventPublisher`: the recorder on the service's event loop, behind a PUB
  socket and a ROUTER socket.
- :class:`KvIndexMirror` and :class:`KvEventSubscriber`: the other end, which rebuilds
  every replica's index from a snapshot and the events after it (torch-free, needing
  only pyzmq and the generated messages), for tests and for routers written in Python.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import zmq
import zmq.asyncio
from google.protobuf.message import DecodeError
from zmq.utils.monitor import parse_monitor_message

from pagoda.v1 import kv_events_pb2
from scheduler_svc.block_hash import ROOT_PARENT
from scheduler_svc.block_manager import BLOCK_REMOVED, BLOCK_STORED, BlockManager, CachedBlock

if TYPE_CHECKING:  # a subscriber needs none of the policy
    from scheduler_svc.scheduler import Scheduler

log = logging.getLogger(__name__)

_CLEARED = 3
# How often the publisher looks for replicas that joined or left while no block changed.
WATCH_S = 0.1
# After this long without a batch the publisher sends an empty one (a heartbeat): it tells
# a new subscriber that its subscription is live, so that a snapshot it asks for next is
# followed by every later event.
HEARTBEAT_S = 1.0

# hash -> (parent hash, b"" for a sequence's first block; the block's token ids)
BlockIndex: TypeAlias = dict[bytes, tuple[bytes, tuple[int, ...]]]
# (replica, block size, kind, hash, parent hash, token ids): an event not numbered yet.
_Pending: TypeAlias = tuple[int, int, int, bytes, bytes, tuple[int, ...]]


def block_index(blocks: BlockManager) -> BlockIndex:
    """A block manager's prefix index in the form the events describe it."""
    return {h: _published(c) for h, c in blocks.cached_blocks().items()}


def core_indexes(core: Scheduler) -> dict[int, BlockIndex]:
    """The core's non-empty indexes by replica: what a :class:`KvIndexMirror` must equal."""
    out = {rid: block_index(core.replica(rid).blocks) for rid in core.replica_ids}
    return {rid: index for rid, index in out.items() if index}


def _published(content: CachedBlock) -> tuple[bytes, tuple[int, ...]]:
    # The hash chain starts from 32 zero bytes; on the wire a first block has no parent.
    return (b"" if content.parent == ROOT_PARENT else content.parent, content.token_ids)


def parents_first(index: Mapping[bytes, tuple[bytes, tuple[int, ...]]]) -> list[bytes]:
    """The hashes of ``index`` ordered so that every parent in it comes before its children.

    A subscriber that builds a tree (not just a dictionary) can then insert them in
    order. A block whose parent is not indexed (evicted while a child stayed, which
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


# -- the scheduler's side ------------------------------------------------------------------


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


# -- the subscriber's side ------------------------------------------------------------------


class KvIndexMirror:
    """Every replica's prefix index, rebuilt from a snapshot and the events after it.

    ``replicas[replica_id]`` maps each block hash to ``(parent hash, token ids)``; the
    parent is ``b""`` for a sequence's first block. ``sequence_number`` is the last
    event reflected, None until the first snapshot; ``applied`` counts the events
    applied, by kind. An event at or below it is already
    in (an event can reach a subscriber after a snapshot that includes it: they travel
    on two sockets); one beyond the next number means events were lost, and then
    :meth:`apply` refuses the batch and the mirror waits for a new snapshot.
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
