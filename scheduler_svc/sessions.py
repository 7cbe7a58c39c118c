"""Gateway sessions: the ``pagoda.v1.Scheduler`` gRPC service (Session and Stats).

Each gateway holds one bidirectional stream for all its requests. What goes down is
put on the session's bounded queue by the step loops (never awaited: the step loop
must not wait for a slow gateway) and written by the session's own handler; a
gateway that falls a whole queue behind is cut off. Request ids are namespaced by the
session id, and a session that ends in any way aborts every request it submitted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from pagoda.v1 import PROTOCOL_VERSION, common_pb2, session_pb2, session_pb2_grpc
from scheduler_svc.scheduler import QueueFull, Scheduler

log = logging.getLogger(__name__)

# A client that opens the stream but never says `open` is dropped after this long.
OPEN_TIMEOUT_S = 30.0
# What a submit rejected while draining advises: the replacement scheduler (or this one,
# restarted) is usually there by then, and the gateway answers 503 meanwhile.
DRAINING_RETRY_AFTER_S = 1
# What a submit refused by a full queue advises: a queue of requests a few seconds long
# moves by many requests a second, so a short wait is a fair first guess.
QUEUE_FULL_RETRY_AFTER_S = 1

Status = tuple[grpc.StatusCode, str]
Update = session_pb2.SchedulerUpdate


@dataclass(eq=False)
class GatewaySession:
    """One open stream: its id (the namespace of its request ids) and its send queue."""

    session_id: str
    gateway_id: str
    queue: asyncio.Queue[Update | None]
    # Set when the session is over; a status to end the stream with, if not OK.
    ended: bool = False
    status: Status | None = None


class SessionHub(session_pb2_grpc.SchedulerServicer):
    """Serves Session and Stats; the step loops deliver outputs through ``deliver``."""

    def __init__(
        self,
        core: Scheduler,
        model: common_pb2.ModelInfo,
        wake: Callable[[], None],
        stats: Callable[[], session_pb2.StatsResponse],
        queue_size: int,
        request_timeout_s: float = 0.0,
    ):
        self._core = core
        # Applied to submits that carry no deadline of their own; 0: none.
        self._request_timeout_ms = int(request_timeout_s * 1000)
        self._model = model
        self._wake = wake
        self._stats = stats
        self._queue_size = queue_size
        self.sessions: dict[str, GatewaySession] = {}
        self.accepting = True
        # The latest load sent to every session; a new session gets it after `opened`.
        self.load: session_pb2.SchedulerLoad | None = None
        self._ids = itertools.count(1)
        self._nonce = secrets.token_hex(3)

    # -- the gRPC methods --------------------------------------------------------------

    async def Session(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        """One gateway's stream; its messages are read from ``context`` by a reader task."""
        session = await self._open(context)
        if session is None:
            return
        reader = asyncio.create_task(self._read(session, context), name="session-read")
        try:
            while (update := await session.queue.get()) is not None:
                await context.write(update)
        finally:
            reader.cancel()
            self.close(session, None)
        if session.status is not None:
            await context.abort(*session.status)

    async def Stats(
        self, request: session_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.StatsResponse:
        return self._stats()

    # -- delivery (called from the step loops) -----------------------------------------

    def deliver(self, outputs: dict[str, session_pb2.StepOutputs]) -> None:
        """Queue one step's outputs on each session that advanced; never waits."""
        sessions = self.sessions
        for owner, out in outputs.items():
            session = sessions.get(owner)
            if session is not None:
                self._push(session, Update(outputs=out))

    def publish_load(self, load: session_pb2.SchedulerLoad) -> None:
        """Send ``load`` to every session, unless it is the one they have already."""
        if load == self.load:
            return
        self.load = load
        update = Update(load=load)
        for session in list(self.sessions.values()):
            self._push(session, update)

    def close(self, session: GatewaySession, status: Status | None, flush: bool = False) -> None:
        """End a session: abort its requests and stop its stream (with ``status`` if not
        OK). ``flush`` lets what is already queued go out first.

        A handler blocked in a write (a gateway that stopped reading) ends once that
        write completes: gRPC cannot end a call while a send is pending, and the
        gateway's requests are already aborted, so only that one write stays held.
        """
        if session.ended:
            return
        session.ended, session.status = True, status
        self.sessions.pop(session.session_id, None)
        aborted = self._core.abort_owner(session.session_id)
        if aborted:
            self._wake()
        log.info(
            "session %s (gateway %s) closed%s; %d requests aborted",
            session.session_id, session.gateway_id, f": {status[1]}" if status else "", aborted,
        )  # fmt: skip
        queue = session.queue
        if not flush or queue.full():
            while not queue.empty():
                queue.get_nowait()
        queue.put_nowait(None)

    def close_all(self, status: Status | None, flush: bool = True) -> None:
        for session in list(self.sessions.values()):
            self.close(session, status, flush)

    # -- internals ---------------------------------------------------------------------

    async def _open(self, context: grpc.aio.ServicerContext) -> GatewaySession | None:
        try:
            first = await asyncio.wait_for(context.read(), OPEN_TIMEOUT_S)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no `open` message arrived")
        if first is grpc.aio.EOF:
            return None
        if first.WhichOneof("kind") != "open":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message of a session must be `open`"
            )
        version = first.open.protocol_version
        if version != PROTOCOL_VERSION:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the gateway speaks session protocol {version}, this scheduler {PROTOCOL_VERSION}",
            )
        if not self.accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the scheduler is shutting down")
        session_id = f"{next(self._ids)}-{self._nonce}"
        session = GatewaySession(
            session_id, first.open.gateway_id, asyncio.Queue(maxsize=self._queue_size)
        )
        self.sessions[session_id] = session
        opened = session_pb2.SessionOpened(
            protocol_version=PROTOCOL_VERSION, session_id=session_id, model=self._model
        )
        session.queue.put_nowait(Update(opened=opened))
        if self.load is not None and not session.queue.full():  # a queue of 1 holds `opened`
            session.queue.put_nowait(Update(load=self.load))
        log.info("session %s opened by gateway %r", session_id, session.gateway_id)
        return session

    async def _read(self, session: GatewaySession, context: grpc.aio.ServicerContext) -> None:
        status: Status | None = None
        try:
            while (message := await context.read()) is not grpc.aio.EOF:
                status = self._handle(session, message)
                if status is not None:
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke: the session ends like any other
            log.debug("session %s: read failed: %r", session.session_id, exc)
        self.close(session, status, flush=status is None)

    def _handle(
        self, session: GatewaySession, message: session_pb2.GatewayMessage
    ) -> Status | None:
        """Apply one message; a status when it ends the session (a protocol error)."""
        kind = message.WhichOneof("kind")
        owner = session.session_id
        if kind == "submit":
            self._submit(session, message.submit)
        elif kind == "abort":
            if self._core.abort(message.abort.request_id, owner):
                self._wake()
        elif kind == "finish":
            finish = message.finish
            reason = finish.reason or common_pb2.FINISH_REASON_STOP
            record = self._core.finish(finish.request_id, finish.index, reason, owner)
            if record is not None:
                self._wake()
                self._push(session, Update(outputs=session_pb2.StepOutputs(finished=[record])))
        elif kind == "open":
            return grpc.StatusCode.INVALID_ARGUMENT, "`open` sent twice on one session"
        return None

    def _submit(self, session: GatewaySession, submit: session_pb2.Submit) -> None:
        if not self.accepting:
            self._reject(
                session,
                submit.request_id,
                session_pb2.Rejected.DRAINING,
                "the scheduler is shutting down; retry",
                DRAINING_RETRY_AFTER_S,
            )
            return
        if not submit.deadline_unix_ms and self._request_timeout_ms:
            submit.deadline_unix_ms = int(time.time() * 1000) + self._request_timeout_ms
        try:
            self._core.add(submit, time.monotonic(), session.session_id)
        except QueueFull as exc:
            self._reject(
                session,
                submit.request_id,
                session_pb2.Rejected.QUEUE_FULL,
                str(exc),
                QUEUE_FULL_RETRY_AFTER_S,
            )
            return
        except ValueError as exc:
            self._reject(session, submit.request_id, session_pb2.Rejected.INVALID, str(exc))
            return
        self._wake()

    def _reject(
        self, session: GatewaySession, request_id: str, reason: int, message: str, retry: int = 0
    ) -> None:
        rejected = session_pb2.Rejected(
            request_id=request_id, reason=reason, message=message, retry_after_s=retry
        )
        self._push(session, Update(rejected=rejected))

    def _push(self, session: GatewaySession, update: Update) -> None:
        try:
            session.queue.put_nowait(update)
        except asyncio.QueueFull:
            log.warning(
                "session %s fell %d messages behind: cut off", session.session_id, self._queue_size
            )
            self.close(
                session,
                (grpc.StatusCode.RESOURCE_EXHAUSTED, "the gateway fell too far behind the stream"),
            )
