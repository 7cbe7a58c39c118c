"""The scheduler service: the core behind a gRPC server, a ZeroMQ step port and probes.

Everything runs on one asyncio event loop (uvloop under ``pagoda scheduler``): the
gRPC sessions, the step port's receive task, one step loop per replica, and a tick
that proves the loop responsive and judges whether the engine has stalled. The core
is plain Python and is only ever called from that loop. The probe server answers
from a thread of its own, reading only thread-safe values and a metrics snapshot that
the loop takes for it.

Lifecycle: ``start()`` binds everything and returns the ports; ``request_stop()``
(SIGTERM) starts the drain; ``serve()`` returns once drained and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pagoda.announcements import SCHEDULER_KV_EVENTS, SCHEDULER_LISTENING
from pagoda.model_card.card import ModelCard
from pagoda.probes import ProbeServer
from pagoda.v1 import session_pb2, session_pb2_grpc
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.kv_events import KvEventPublisher
from scheduler_svc.metrics import SchedulerMetrics, Snapshot, load_of
from scheduler_svc.registration import Expected
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.sessions import SessionHub
from scheduler_svc.settings import ServiceSettings, host_port
from scheduler_svc.workers import WorkerHub

log = logging.getLogger(__name__)

SERVICE_NAME = session_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name
# The loop ticks this often; /health fails once the last tick is HEALTH_STALE_S old.
TICK_S = 0.25
HEALTH_STALE_S = 5.0
# Gateways learn the scheduler's load (SchedulerLoad) at most this often, from the tick.
LOAD_INTERVAL_S = 0.5
# How long a scrape waits for the loop to take a fresh snapshot before serving the last one.
SCRAPE_WAIT_S = 2.0
# Internal channels: ping an idle connection so a half-open one is noticed, and let
# gateways ping as often as every 5 s. No SO_REUSEPORT: a second scheduler on the same
# port must fail to start, not silently take half of the gateways.
GRPC_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
]


@dataclass(frozen=True)
class Addresses:
    """The ports actually bound (port 0 in the settings: any free one)."""

    host: str
    grpc_port: int
    step_port: int
    http_port: int
    # The prefix-cache event and snapshot ports, when published.
    kv_events_port: int | None = None
    kv_snapshot_port: int | None = None

    def listening_line(self) -> str:
        """The line launchers parse to find the scheduler (pagoda.announcements)."""
        h = self.host
        line = SCHEDULER_LISTENING.line(
            grpc=host_port(h, self.grpc_port),
            step=host_port(h, self.step_port),
            http=host_port(h, self.http_port),
        )
        if self.kv_events_port is not None and self.kv_snapshot_port is not None:
            # Appended only, so parsers of the three ports above still match.
            line += " " + SCHEDULER_KV_EVENTS.line(
                kv_events=host_port(h, self.kv_events_port),
                kv_snapshot=host_port(h, self.kv_snapshot_port),
            )
        return line


class SchedulerService:
    """Wires the core, the session hub, the worker hub, metrics and health together."""

    def __init__(self, card: ModelCard, config: SchedulerConfig, settings: ServiceSettings):
        self.settings = settings
        self.core = Scheduler(config)
        model = card.to_proto()
        model.max_model_len = config.max_model_len
        self.metrics = SchedulerMetrics(card.name, config.block_size, config.enable_prefix_caching)
        self.sessions = SessionHub(
            self.core,
            model,
            self._wake,
            self.stats,
            settings.session_queue_size,
            request_timeout_s=settings.request_timeout_s,
        )
        expected = Expected(
            card.identity, config.block_size, config.max_model_len, settings.shared_secret
        )
        self.workers = WorkerHub(
            self.core, settings, expected, self.sessions.deliver, self._on_step, self._on_leave
        )
        kv_ports = settings.kv_ports
        self.kv_events = (
            KvEventPublisher(self.core, settings.host, *kv_ports) if kv_ports is not None else None
        )
        self.health = health.aio.HealthServicer()
        self.draining = False
        self.stalled = False
        self._serving = False
        self._tick = time.monotonic()
        self._progress_at = self._tick
        self._load_at = 0.0
        self._server: grpc.aio.Server | None = None
        self._probes: ProbeServer | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> Addresses:
        """Bind the step port, the gRPC server and the probes, and start every loop."""
        self._loop = asyncio.get_running_loop()
        s = self.settings
        step_port = self.workers.bind()
        kv_ports = self.kv_events.bind() if self.kv_events is not None else (None, None)
        self._server = grpc.aio.server(options=GRPC_OPTIONS)
        session_pb2_grpc.add_SchedulerServicer_to_server(self.sessions, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME],
            self._server,
        )  # fmt: skip
        grpc_port = self._server.add_insecure_port(host_port(s.host, s.grpc_port))
        self._probes = ProbeServer(
            s.host.strip("[]"),
            s.http_port,
            health=self.is_healthy,
            ready=self.is_ready,
            registry=self.metrics.registry,
            before_scrape=self._refresh_from_probe_thread,
        )
        await self._server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.workers.start()
        if self.kv_events is not None:
            self.kv_events.start()
        self._ticker = asyncio.create_task(self._tick_loop(), name="tick")
        self.sessions.publish_load(self.load())  # what the first session is told
        self.refresh_metrics()
        self._probes.start()
        self._serving = True
        return Addresses(s.host, grpc_port, step_port, self._probes.port, *kv_ports)

    async def serve(self) -> None:
        """Run until ``request_stop``, then drain and close."""
        await self._stop.wait()
        await self.drain()
        await self.close()

    def request_stop(self) -> None:
        """First call: drain (SIGTERM). Second: stop waiting for running requests."""
        if self._stop.is_set():
            log.warning("second stop signal: not waiting for running requests")
            self._force.set()
        self._stop.set()

    async def drain(self) -> None:
        """Refuse new submits, drop the queue of never-started sequences (reported), and
        give running ones ``drain_grace_s`` to finish."""
        self.draining = True
        self.sessions.accepting = False
        await self.health.enter_graceful_shutdown()
        dropped = self.core.abort_unadmitted()
        for owner, records in dropped.items():
            self.sessions.deliver({owner: session_pb2.StepOutputs(finished=records)})
        self._wake()
        grace = self.settings.drain_grace_s
        log.info(
            "draining: %d queued sequences dropped, %d running; grace %gs",
            sum(map(len, dropped.values())), self.core.num_running, grace,
        )  # fmt: skip
        deadline = time.monotonic() + grace
        while self.core.has_unfinished() and not self._force.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._force.wait(), min(left, TICK_S / 5))
        unfinished = self.core.num_running + self.core.num_waiting
        if unfinished:
            log.warning("drain over with %d sequences unfinished; they are aborted", unfinished)

    async def close(self) -> None:
        """End every session, stop the servers and the loops; safe to call once started."""
        self._serving = False
        self.sessions.close_all((grpc.StatusCode.UNAVAILABLE, "the scheduler is shutting down"))
        if self._server is not None:
            await self._server.stop(grace=2.0)
        await self.workers.close()
        if self.kv_events is not None:
            await self.kv_events.close()
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        if self._probes is not None:
            self._probes.stop()
        log.info("scheduler stopped")

    # -- state ---------------------------------------------------------------------------

    def stats(self) -> session_pb2.StatsResponse:
        """The core's stats, with every known replica's state and the open sessions."""
        stats = self.core.stats()
        self.workers.table.merge_into(stats)
        stats.num_sessions = len(self.sessions.sessions)
        return stats

    def is_healthy(self) -> bool:
        """Liveness: the event loop ticked recently (read from the probe thread)."""
        return time.monotonic() - self._tick < HEALTH_STALE_S

    def is_ready(self) -> bool:
        """Readiness: accepting sessions and not draining (never about workers)."""
        return self._serving and not self.draining

    def load(self) -> session_pb2.SchedulerLoad:
        """The figures every gateway shows under vLLM's names, from the same stats as
        this scheduler's /metrics; computed in the tick, never in the step loop."""
        return load_of(self.stats())

    def refresh_metrics(self) -> None:
        self.metrics.snapshot = Snapshot(self.stats(), self.stalled)

    # -- internals -----------------------------------------------------------------------

    def _wake(self) -> None:
        self.workers.wake_all()

    def _on_leave(self) -> None:
        if self.kv_events is not None:
            self.kv_events.changed()

    def _on_step(self, seconds: float) -> None:
        self.metrics.step_seconds.observe(seconds)
        self._progress_at = time.monotonic()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = self._tick = time.monotonic()
            self._expire()
            if now - self._load_at >= LOAD_INTERVAL_S:
                self._load_at = now
                self.sessions.publish_load(self.load())
            stalled = self._judge_stall(now)
            if stalled != self.stalled:
                self.stalled = stalled
                await self._set_health(stalled)

    def _expire(self) -> None:
        """End the requests past their deadline (a gateway that is gone cannot abort them)."""
        expired = self.core.expire(int(time.time() * 1000))
        if expired:
            self.sessions.deliver(
                {owner: session_pb2.StepOutputs(finished=fins) for owner, fins in expired.items()}
            )
            log.info("%d sequences past their deadline aborted", sum(map(len, expired.values())))
            self._wake()

    def _judge_stall(self, now: float) -> bool:
        """Stalled: work pending on live replicas and no step completed for the timeout."""
        core = self.core
        live = bool(self.workers.table.live)
        pending = core.num_running > 0 or (live and core.num_waiting > 0)
        if not pending:
            self._progress_at = now
            return False
        return now - self._progress_at > self.settings.stall_timeout_s

    async def _set_health(self, stalled: bool) -> None:
        if stalled:
            idle = time.monotonic() - self._progress_at
            log.error("engine stalled: work pending and no step completed for %.1fs", idle)
        else:
            log.info("engine progressing again")
        status = (
            health_pb2.HealthCheckResponse.NOT_SERVING
            if stalled
            else health_pb2.HealthCheckResponse.SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def _refresh_from_probe_thread(self) -> None:
        """Ask the loop for a fresh snapshot; on a busy or closed loop, serve the last one."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._refresh(), loop).result(SCRAPE_WAIT_S)
        except Exception:  # a timeout or a loop going away: stale values, not an error page
            log.debug("serving the previous metrics snapshot")

    async def _refresh(self) -> None:
        self.refresh_metrics()
