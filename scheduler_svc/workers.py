"""The step port: workers register on a ZeroMQ ROUTER, and each replica runs one step loop.

The event loop watches the ROUTER's file descriptor and drains every message that is
there in one callback, dispatching each (Hello, StepResult, Heartbeat, Drain) on the
spot: no future and no task wake-up per message, which zmq.asyncio would cost on
every step. One step loop per replica turns ``schedule`` into a plan, awaits
that plan's result and turns ``update`` into per-session outputs; one watch task
declares dead the replicas that stop beating or whose step runs past the step
timeout, and ends the grace period of draining ones. Everything runs on the service's
event loop, so the core is never touched from two places at once. A replica with
nothing to run sleeps on its wake event instead of polling: every submit, abort,
finish, join and leave sets it (and a timer, while it leaves a request to another
replica for prefix affinity, so it takes that request once the wait is over).

A worker that sends ``Drain`` with a grace period keeps its replica: the replica
admits nothing new and runs what it holds; once it holds nothing, or when the grace
period is over (what is left is re-queued), it leaves and its worker gets
``Reset{reason: "drained"}``, its cue to exit.

Sends use ``NOBLOCK`` on a ``ROUTER_MANDATORY`` socket: a vanished or stuck peer is an
error at once, never a step loop that waits on a dead worker. ZeroMQ's descriptor
signals only changes (it is edge-triggered), and a send may consume the signal of a
message that arrived meanwhile, so each drain and each send ends by asking the socket
itself whether a message is waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable

import zmq
from google.protobuf.message import DecodeError

from pagoda.v1 import session_pb2, step_pb2
from scheduler_svc.registration import Expected, check_hello
from scheduler_svc.replicas import ACTIVE, DEAD, DRAINING, ReplicaHandle, ReplicaTable
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.settings import ServiceSettings

log = logging.getLogger(__name__)

# The reason of the Reset that releases a draining worker.
DRAINED = "drained"

Deliver = Callable[[dict[str, session_pb2.StepOutputs]], None]
OnStep = Callable[[float], None]


class WorkerHub:
    """Membership, liveness and the step loops of every replica, over one ROUTER socket."""

    def __init__(
        self,
        core: Scheduler,
        settings: ServiceSettings,
        expected: Expected,
        deliver: Deliver,
        on_step: OnStep,
        on_leave: Callable[[], None] | None = None,
    ):
        self._core = core
        self._settings = settings
        self._expected = expected
        self._deliver = deliver
        self._on_step = on_step
        # Called right after a replica leaves the core (KV events publish `cleared` then).
        self._on_leave = on_leave
        self.table = ReplicaTable()
        self._replica_ids = itertools.count(1)
        # Per worker id, the (replica, epoch) it was last told to register again for, so a
        # stream of stale heartbeats draws one Reset, not one per beat.
        self._reset_sent: dict[str, tuple[int, int]] = {}
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A restarted worker reuses its identity; the new connection takes it over.
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_due = False  # a drain is scheduled with call_soon
        cfg = core.config
        self._worker_config = step_pb2.WorkerConfig(
            block_size=cfg.block_size,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_num_seqs=cfg.max_num_seqs,
            max_model_len=cfg.max_model_len,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            heartbeat_timeout_ms=settings.heartbeat_timeout_ms,
        )

    # -- lifecycle -----------------------------------------------------------------

    def bind(self) -> int:
        """Bind the ROUTER on the configured host and port; returns the port it got."""
        host = self._settings.host.strip("[]")
        if ":" in host:
            self._sock.setsockopt(zmq.IPV6, 1)
            host = f"[{host}]"
        port = self._settings.step_port
        self._sock.bind(f"tcp://{host}:{port if port else '*'}")
        endpoint = self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        return int(endpoint.rsplit(":", 1)[1])

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.getsockopt(zmq.FD), self._drain)
        self._drain_soon()  # anything that arrived before the reader was added
        self._tasks = [asyncio.create_task(self._watch(), name="step-watch")]

    async def close(self) -> None:
        """Stop every loop and close the socket; workers notice the silence and re-register
        with whichever scheduler answers next."""
        tasks = self._tasks + [h.task for h in self.table.live.values() if h.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._loop is not None:
            self._loop.remove_reader(self._sock.getsockopt(zmq.FD))
            self._loop = None
        self._sock.close(linger=0)
        self._ctx.term()

    def wake_all(self) -> None:
        """Something may be schedulable: wake every idle replica (the first one takes it)."""
        for handle in self.table.live.values():
            handle.wake.set()

    # -- receiving -----------------------------------------------------------------

    # At most this many messages a callback, so a flood cannot hold the loop.
    DRAIN_BATCH = 64

    def _drain(self) -> None:
        """Read and dispatch what the ROUTER holds (the loop calls this when it is
        readable, and after sends)."""
        self._drain_due = False
        sock = self._sock
        if sock.closed:
            return
        for _ in range(self.DRAIN_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._receive(frames)
        self._drain_soon()  # more may be waiting: go on after the loop's other work

    def _drain_soon(self) -> None:
        if self._loop is not None and not self._drain_due:
            self._drain_due = True
            self._loop.call_soon(self._drain)

    def _receive(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            log.warning("dropping a message of %d frames on the step port", len(frames))
            return
        identity, payload = frames
        try:
            message = step_pb2.WorkerMessage.FromString(payload)
        except DecodeError:
            log.warning("dropping an undecodable message from %r", identity)
            return
        try:
            self._dispatch(identity, message)
        except Exception:  # one bad message must not stop the step port
            log.exception("failed to handle a %s from %r", message.WhichOneof("kind"), identity)

    def _dispatch(self, identity: bytes, message: step_pb2.WorkerMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "result":
            self._on_result(identity, message.result)
        elif kind == "heartbeat":
            self._on_heartbeat(identity, message.heartbeat)
        elif kind == "hello":
            self._on_hello(identity, message.hello)
        elif kind == "drain":
            self._on_drain(message.drain)
        else:
            log.debug("ignoring a worker message of kind %s from %r", kind, identity)

    def _on_hello(self, identity: bytes, hello: step_pb2.Hello) -> None:
        refusal = check_hello(hello, self._expected)
        if refusal is not None:
            log.warning("refused worker %r: %s", hello.worker_id, refusal.reason)
            self._send(identity, step_pb2.SchedulerMessage(refusal=refusal))
            return
        old = self.table.by_worker.get(hello.worker_id)
        if old is not None and self.table.live.get(old.replica_id) is old:
            self._end(old, None, "its worker registered again")
        self._reset_sent.pop(hello.worker_id, None)
        replica_id = next(self._replica_ids)
        epoch = self._core.join(replica_id, hello.num_kv_blocks)
        handle = ReplicaHandle(
            replica_id=replica_id,
            epoch=epoch,
            worker_id=hello.worker_id,
            identity=identity,
            num_blocks=hello.num_kv_blocks,
            device=hello.device,
            last_seen=time.monotonic(),
        )
        config = step_pb2.WorkerConfig()
        config.CopyFrom(self._worker_config)
        config.num_kv_blocks = hello.num_kv_blocks
        welcome = step_pb2.Welcome(replica_id=replica_id, epoch=epoch, config=config)
        if not self._send(identity, step_pb2.SchedulerMessage(welcome=welcome)):
            self._core.leave(replica_id)
            return
        self.table.add(handle)
        handle.task = asyncio.create_task(self._run_replica(handle), name=f"replica-{replica_id}")
        log.info(
            "worker %s joined as replica %d epoch %d (%d KV blocks, %s)",
            hello.worker_id, replica_id, epoch, hello.num_kv_blocks, hello.device or "?",
        )  # fmt: skip
        self.wake_all()

    def _on_result(self, identity: bytes, result: step_pb2.StepResult) -> None:
        handle = self.table.live.get(result.replica_id)
        if handle is None or handle.epoch != result.epoch or handle.identity != identity:
            log.debug("dropping a result for replica %d epoch %d", result.replica_id, result.epoch)
            return
        handle.last_seen = time.monotonic()
        pending = handle.pending
        expected = pending is not None and not pending.done()
        if not expected or (result.step != handle.step_in_flight and not result.error.kind):
            self._reset(handle, f"result for step {result.step}, expected {handle.step_in_flight}")
            return
        pending.set_result(result)  # an error result goes to the step loop, which resets

    def _on_heartbeat(self, identity: bytes, beat: step_pb2.Heartbeat) -> None:
        handle = self.table.by_worker.get(beat.worker_id)
        if handle is not None and handle.state in (ACTIVE, DRAINING):
            handle.last_seen = time.monotonic()
        # Live: taking work, or draining and still running what it holds.
        live = handle is not None and self.table.live.get(handle.replica_id) is handle
        active = handle if live else None
        answer = step_pb2.Heartbeat(
            replica_id=active.replica_id if active else 0,
            epoch=active.epoch if active else 0,
            last_step=active.steps if active else 0,
        )
        self._send(identity, step_pb2.SchedulerMessage(heartbeat=answer))
        draining = handle is not None and handle.state == DRAINING
        if active is None and beat.replica_id and not draining:
            # The worker believes in a replica this scheduler does not run (declared dead,
            # or a previous scheduler's): it must register again.
            self._tell_to_register(
                beat.worker_id,
                f"{beat.worker_id}/main".encode(),
                (beat.replica_id, beat.epoch),
                f"replica {beat.replica_id} epoch {beat.epoch} is not live on this scheduler",
            )

    def _on_drain(self, drain: step_pb2.Drain) -> None:
        """The worker is shutting down. Without a grace period its replica leaves at once
        (sequences re-queued); with one, it runs what it holds and takes nothing new."""
        handle = self.table.by_worker.get(drain.worker_id)
        if handle is None or handle.state != ACTIVE:
            return
        if not drain.grace_ms:
            self._end(handle, DRAINING, "its worker is shutting down")
            return
        rid = handle.replica_id
        self._core.drain(rid)
        handle.state = DRAINING
        handle.drain_deadline = time.monotonic() + drain.grace_ms / 1000
        log.info(
            "replica %d (worker %s) draining: %d sequences running, grace %.1fs",
            rid, handle.worker_id, len(self._core.replica(rid).running), drain.grace_ms / 1000,
        )  # fmt: skip
        handle.wake.set()  # an idle one leaves at once

    # -- the step loop ---------------------------------------------------------------

    async def _run_replica(self, handle: ReplicaHandle) -> None:
        """The step loop, and a reset of the replica should it ever fail (its worker then
        registers again) rather than a replica that silently stops stepping."""
        try:
            await self._step_loop(handle)
        except Exception:
            log.exception("the step loop of replica %d failed", handle.replica_id)
            self._reset(handle, "the scheduler failed while stepping this replica")

    async def _step_loop(self, handle: ReplicaHandle) -> None:
        """schedule -> plan -> result -> update -> outputs, one plan in flight, until the
        replica leaves (then this task is cancelled or returns)."""
        core = self._core
        loop = asyncio.get_running_loop()
        rid = handle.replica_id
        while True:
            handle.wake.clear()
            if handle.state == DRAINING and not core.replica(rid).running:
                self._release(handle, "drained: nothing left to run")
                return
            plan = core.schedule(rid, time.monotonic())
            if plan is None:
                await self._idle(handle)
                continue
            pending = handle.pending = loop.create_future()
            handle.step_in_flight = plan.step
            started = handle.step_started = time.monotonic()
            if not self._send(handle.identity, step_pb2.SchedulerMessage(plan=plan)):
                self._end(handle, DEAD, "its worker is unreachable")
                return
            result = await pending
            handle.pending = handle.step_started = None
            if not self._apply(handle, result, time.monotonic() - started):
                return

    async def _idle(self, handle: ReplicaHandle) -> None:
        """Sleep until woken, or until a request this replica left for another one (prefix
        affinity) is its to take."""
        until = self._core.replica(handle.replica_id).deferred_until
        if until is None:
            await handle.wake.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(handle.wake.wait(), max(0.0, until - time.monotonic()))

    def _apply(self, handle: ReplicaHandle, result: step_pb2.StepResult, seconds: float) -> bool:
        """Apply one result; False when the replica was reset instead."""
        if result.error.kind:
            error = result.error
            kind = step_pb2.StepError.Kind.Name(error.kind)
            self._reset(handle, f"the worker refused step {result.step}: {kind} {error.detail}")
            return False
        try:
            outputs = self._core.update(result)
        except ValueError as exc:
            self._reset(handle, f"malformed result for step {result.step}: {exc}")
            return False
        handle.steps += 1
        self._on_step(seconds)
        if outputs:
            self._deliver(outputs)
        return True

    # -- liveness --------------------------------------------------------------------

    async def _watch(self) -> None:
        settings = self._settings
        silence = settings.heartbeat_timeout_ms / 1000
        tick = min(0.5, max(0.02, settings.heartbeat_interval_ms / 4000))
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for handle in list(self.table.live.values()):
                quiet = now - handle.last_seen
                if quiet > silence:
                    self._end(handle, DEAD, f"no heartbeat for {quiet:.1f}s", tell=True)
                elif handle.drain_deadline is not None and now >= handle.drain_deadline:
                    left = len(self._core.replica(handle.replica_id).running)
                    self._release(handle, f"drain grace over, {left} sequences re-queued")
                elif (
                    handle.step_started is not None
                    and now - handle.step_started > settings.step_timeout_s
                ):
                    why = f"step {handle.step_in_flight} ran past {settings.step_timeout_s:g}s"
                    self._end(handle, DEAD, why, tell=True)
            self.table.prune(now, silence)

    def _release(self, handle: ReplicaHandle, why: str) -> None:
        """A draining replica is done (or out of time): it leaves, and its worker is told
        it may exit."""
        key = (handle.replica_id, handle.epoch)
        self._end(handle, DRAINING, why)
        self._tell_to_register(handle.worker_id, handle.identity, key, DRAINED)

    def _reset(self, handle: ReplicaHandle, why: str) -> None:
        """Take a replica out and tell its worker to drop its state and register again."""
        self._end(handle, None, why, tell=True)

    def _end(self, handle: ReplicaHandle, state: int | None, why: str, tell: bool = False) -> None:
        """The replica leaves the core (its sequences are re-queued) and its loop stops.

        ``state`` DRAINING or DEAD keeps it listed in Stats; None forgets it. ``tell``
        sends its worker a Reset, so one that is merely slow comes back as a new replica.
        """
        if self.table.live.get(handle.replica_id) is not handle:
            return
        self._core.leave(handle.replica_id)
        if self._on_leave is not None:
            self._on_leave()
        self.table.end(handle, state, time.monotonic())
        if handle.pending is not None and not handle.pending.done():
            handle.pending.cancel()
        task = handle.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        level = logging.INFO if state == DRAINING else logging.WARNING
        log.log(level, "replica %d (worker %s) left: %s", handle.replica_id, handle.worker_id, why)
        if tell:
            key = (handle.replica_id, handle.epoch)
            self._tell_to_register(handle.worker_id, handle.identity, key, why)
        self.wake_all()

    def _tell_to_register(
        self, worker_id: str, identity: bytes, key: tuple[int, int], why: str
    ) -> None:
        if self._reset_sent.get(worker_id) == key:
            return
        self._reset_sent[worker_id] = key
        reset = step_pb2.Reset(reason=why, replica_id=key[0], epoch=key[1])
        self._send(identity, step_pb2.SchedulerMessage(reset=reset))

    # -- sending ---------------------------------------------------------------------

    def _send(self, identity: bytes, message: step_pb2.SchedulerMessage) -> bool:
        """Send without waiting; False when the peer is gone or not keeping up."""
        sock = self._sock
        try:
            sock.send_multipart([identity, message.SerializeToString()], zmq.NOBLOCK)
        except zmq.ZMQError as error:  # Again (not keeping up) or EHOSTUNREACH (gone)
            log.debug("cannot send a %s to %r: %s", message.WhichOneof("kind"), identity, error)
            return False
        finally:
            # The send may have taken in a message whose edge the loop will not see.
            if not sock.closed and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._drain_soon()
        return True
