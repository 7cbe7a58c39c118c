"""The gateway's one session to the scheduler: a bidirectional ``Scheduler.Session``
stream that carries all of this gateway's requests.

The client opens the stream, sends ``open{protocol_version, gateway_id}``, checks the
scheduler's answer (protocol version, and the model identity against this gateway's
card, so text is never tokenized for another model) and keeps its ``ModelInfo``. Then
it hands every update to ``on_update`` until the stream ends, however it ends. It
reconnects by itself with exponential backoff; while no session is open ``send``
raises at once (the API answers 503) instead of queueing, and ``on_lost`` fails the
requests that were in flight, since the scheduler aborted them when the stream broke.

While the session is open the client also watches the scheduler's gRPC health
(``grpc.health.v1.Health/Watch`` of ``pagoda.v1.Scheduler``, on the same channel):
the scheduler says NOT_SERVING when its engine has work and completes no step (or it
is shutting down), and the gateway then answers new requests 503 at once instead of
queueing them behind a stall. A scheduler without the health service counts as serving.

The scheduler also sends its load (``SchedulerLoad``: queue, running sequences, KV
usage, live replicas) after ``opened`` and whenever it changes. The client keeps the
latest in ``load`` and hands it to ``on_load``; it is None while no session is open.

The channel uses keepalive pings, so a half-open connection (a scheduler host that
vanished without closing its sockets) is noticed within about 15 s. The scheduler's
server must accept pings that often (``grpc.http2.min_ping_interval_without_data_ms``
at most ``KEEPALIVE_TIME_MS``, ``grpc.keepalive_permit_without_calls``), or it
answers them with GOAWAY.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import errors
from pagoda.v1 import PROTOCOL_VERSION, common_pb2, session_pb2, session_pb2_grpc

log = logging.getLogger(__name__)

KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Long prompts go up and many sequences' tokens come down in one message.
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # This client backs off by itself; the channel's own backoff would add up to 2 min.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    # The scheduler is an internal peer: an egress proxy set in the environment
    # (http_proxy, grpc_proxy) must not carry the session.
    ("grpc.enable_http_proxy", 0),
    ("grpc.max_reconnect_backoff_ms", 1_000),
)


# The scheduler's service name in its gRPC health (what its stall detection sets).
SCHEDULER_HEALTH_SERVICE = session_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name
# A health watch that broke while the session stays open is opened again after this long.
HEALTH_RETRY_S = 1.0
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class SessionRefused(Exception):
    """The scheduler answered, but this gateway cannot use the session."""


@dataclass(frozen=True)
class Backoff:
    """Delays between connection attempts: doubling from ``initial`` up to ``maximum``."""

    initial: float = 0.05
    maximum: float = 2.0


class SessionClient:
    """Keeps one session open; ``run()`` is the task that does it."""

    def __init__(
        self,
        target: str,
        gateway_id: str,
        *,
        on_update: Callable[[session_pb2.SchedulerUpdate], None],
        on_state: Callable[[bool], None],
        on_engine: Callable[[bool], None] | None = None,
        on_load: Callable[[session_pb2.SchedulerLoad | None], None] | None = None,
        expected_identity: str = "",
        backoff: Backoff = Backoff(),
        open_timeout_s: float = 10.0,
    ) -> None:
        self.target = target
        self.gateway_id = gateway_id
        self._on_update = on_update
        self._on_state = on_state
        self._on_engine = on_engine
        self._on_load = on_load
        self._expected_identity = expected_identity
        self._backoff = backoff
        self._open_timeout_s = open_timeout_s
        self._outbox: asyncio.Queue[session_pb2.GatewayMessage | None] | None = None
        self._closing = False
        self._opened = False
        self._last_report = ""
        self.model: common_pb2.ModelInfo | None = None
        self.session_id = ""
        # False while the scheduler's health says NOT_SERVING (a stalled engine).
        self.engine_serving = True
        # The scheduler's latest load on the open session; None while none is open.
        self.load: session_pb2.SchedulerLoad | None = None

    @property
    def connected(self) -> bool:
        return self._outbox is not None

    def send(self, message: session_pb2.GatewayMessage) -> None:
        """Queue a message on the open session; raises 503 when none is open."""
        if self._outbox is None:
            raise errors.no_session()
        self._outbox.put_nowait(message)

    def close(self) -> None:
        """Stop reconnecting and end the stream (the scheduler aborts what is left)."""
        self._closing = True
        if self._outbox is not None:
            self._outbox.put_nowait(None)

    async def run(self) -> None:
        """Connect, serve the stream until it ends, back off, repeat until closed."""
        delay = self._backoff.initial
        while not self._closing:
            self._opened = False
            try:
                await self._serve_once()
            except SessionRefused as exc:
                self._report(logging.ERROR, f"scheduler {self.target} refused the session: {exc}")
            except grpc.aio.AioRpcError as exc:
                self._report_rpc_error(exc)
            except (TimeoutError, OSError) as exc:
                self._report(logging.WARNING, f"session to {self.target} failed: {exc!r}")
            if self._closing:
                return
            delay = self._backoff.initial if self._opened else min(delay * 2, self._backoff.maximum)
            await asyncio.sleep(delay)

    def _report_rpc_error(self, exc: grpc.aio.AioRpcError) -> None:
        code = exc.code()
        if self._opened:
            self._report(logging.WARNING, f"session to {self.target} ended: {code.name}")
        elif code == grpc.StatusCode.UNAVAILABLE:
            self._report(logging.WARNING, f"scheduler {self.target} unreachable; retrying")
        else:
            self._report(
                logging.ERROR, f"scheduler {self.target} refused the session: {exc.details()}"
            )

    def _report(self, level: int, message: str) -> None:
        """Log a connection problem once, not at every retry; a session that opens
        clears the memory."""
        if self._opened:
            self._last_report = ""
        if message != self._last_report:
            log.log(level, message)
            self._last_report = message

    async def _serve_once(self) -> None:
        """One connection, until its stream ends; sets ``_opened`` once it was open."""
        outbox: asyncio.Queue[session_pb2.GatewayMessage | None] = asyncio.Queue()
        channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        call = session_pb2_grpc.SchedulerStub(channel).Session(_drain(outbox))
        try:
            outbox.put_nowait(_open_message(self.gateway_id))
            first = await asyncio.wait_for(call.read(), self._open_timeout_s)
            self._accept(first)
            self._outbox, self._opened = outbox, True
            log.info(
                "session %s open to scheduler %s (model %s)",
                self.session_id,
                self.target,
                self.model.name if self.model else "?",
            )
            self._on_state(True)
            watch = asyncio.create_task(self._watch_health(channel), name="scheduler-health")
            try:
                await self._read_all(call)
            finally:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
            log.warning("session %s closed by the scheduler", self.session_id)
        finally:
            self._outbox = None
            outbox.put_nowait(None)
            call.cancel()
            self._set_engine(True, quiet=True)  # no session: 503 for that reason instead
            self._set_load(None)
            if self._opened:
                self._on_state(False)
            with contextlib.suppress(Exception):
                await channel.close(grace=None)

    async def _watch_health(self, channel: grpc.aio.Channel) -> None:
        """Follow the scheduler's health for as long as the session is open."""
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=SCHEDULER_HEALTH_SERVICE)
        while True:
            try:
                async for answer in stub.Watch(request):
                    self._set_engine(answer.status != NOT_SERVING)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self._set_engine(True)
                    return  # no health service: nothing will ever say it stalled
                log.debug("health watch on %s ended: %s", self.target, exc.code().name)
            await asyncio.sleep(HEALTH_RETRY_S)

    def _set_engine(self, serving: bool, quiet: bool = False) -> None:
        if serving == self.engine_serving:
            return
        self.engine_serving = serving
        if quiet:
            pass
        elif serving:
            log.info("scheduler %s is serving again", self.target)
        else:
            log.warning(
                "scheduler %s reports NOT_SERVING (stalled engine or shutting down): new "
                "requests are answered 503",
                self.target,
            )
        if self._on_engine is not None:
            self._on_engine(serving)

    async def _read_all(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            update = await call.read()
            if update is grpc.aio.EOF:
                return
            try:
                if update.WhichOneof("kind") == "load":
                    self._set_load(update.load)
                else:
                    self._on_update(update)
            except Exception:  # one bad update must not take the session down
                log.exception("could not apply an update from the scheduler")

    def _set_load(self, load: session_pb2.SchedulerLoad | None) -> None:
        if load is None and self.load is None:
            return
        self.load = load
        if self._on_load is not None:
            self._on_load(load)

    def _accept(self, first: object) -> None:
        if first is grpc.aio.EOF or not isinstance(first, session_pb2.SchedulerUpdate):
            raise SessionRefused("the stream ended before the scheduler answered open")
        if first.WhichOneof("kind") != "opened":
            raise SessionRefused(f"expected 'opened', got {first.WhichOneof('kind')!r}")
        opened = first.opened
        if opened.protocol_version != PROTOCOL_VERSION:
            raise SessionRefused(
                f"the scheduler speaks protocol {opened.protocol_version}, this gateway "
                f"{PROTOCOL_VERSION}: deploy matching versions"
            )
        identity = opened.model.identity
        if self._expected_identity and identity and identity != self._expected_identity:
            raise SessionRefused(
                f"the scheduler serves model {identity[:12]}, this gateway's card is "
                f"{self._expected_identity[:12]}: give both the same model card"
            )
        self.model = opened.model
        self.session_id = opened.session_id


def _open_message(gateway_id: str) -> session_pb2.GatewayMessage:
    return session_pb2.GatewayMessage(
        open=session_pb2.OpenSession(protocol_version=PROTOCOL_VERSION, gateway_id=gateway_id)
    )


async def _drain(
    outbox: asyncio.Queue[session_pb2.GatewayMessage | None],
) -> AsyncIterator[session_pb2.GatewayMessage]:
    """The request stream: whatever is queued, until None ends it."""
    while (message := await outbox.get()) is not None:
        yield message
