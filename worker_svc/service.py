"""The worker process's shell: the main loop between the runner and the scheduler.

The ``ModelRunner`` is the worker's core and decides every protocol question that
concerns state (stale epochs, step gaps, unknown sequences). This shell only moves
``WorkerMessage`` / ``SchedulerMessage`` bytes between the runner and the scheduler
(docs/services.md, "The step protocol in motion"):

- the main thread owns the ``<worker_id>/main`` DEALER (``worker_svc.connection``):
  Hello, Welcome / Refusal / Reset, plans in and results out, Drain on the way out;
- a heartbeat thread (``worker_svc.heartbeat``) beats on a DEALER of its own, so a
  silent scheduler is noticed even while a long step holds the main thread;
- a probe server answers ``/health``, ``/ready`` and ``/metrics`` from its own thread.

Before its first Hello the shell warms the runner up (one dummy prefill and decode,
``ModelRunner.warm_up``) and logs how long that took: a replica that registers can take
a step at once, so the first request after the gateways say ready never waits for a
kernel compilation or a first-call allocation.

The worker registers again (a new Hello) whenever the scheduler may have forgotten it:
after a Reset, when heartbeat answers stop for the timeout, and when the main
connection drops (a restarted scheduler may well answer heartbeats, so silence alone
would not tell). Torch-free, so the process can set its thread count before torch loads.

Leaving (SIGTERM) is a graceful drain: the worker finishes the step in hand, sends
``Drain{grace_ms}`` and keeps running plans, while the scheduler admits nothing new to
it, until the scheduler releases it with a ``Reset`` (its sequences are done, or the
grace period is over and the rest went back to the queue); then it exits 0. It exits 0
by itself when no release comes within the grace period and a margin, when the
scheduler falls silent, or on a second signal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sized
from typing import Protocol

import zmq

from pagoda.announcements import WORKER_REGISTERED
from pagoda.probes import ProbeServer
from pagoda.v1 import PROTOCOL_VERSION, step_pb2
from worker_svc.connection import POLL_S, Connection, dropped, parse
from worker_svc.heartbeat import Heartbeat, Link
from worker_svc.metrics import WorkerMetrics
from worker_svc.settings import ModelInfo, WorkerSettings, endpoint

log = logging.getLogger("pagoda.worker")

StepError = step_pb2.StepError

# How long a Hello that could not be sent (no connection yet) waits before the next try.
HELLO_RESEND_S = 0.2
# How long a sent Hello may go unanswered before it is sent again.
HELLO_ANSWER_WAIT_S = 2.0
# A main loop that has not come round for this long while idle is stuck (it polls every
# POLL_S); a step may run much longer, up to STEP_HANG_S, before liveness gives up on it
# (the scheduler's own step timeout declares the replica dead long before that).
LOOP_STALL_S = 30.0
STEP_HANG_S = 600.0
# A draining worker waits this long past its grace period for the scheduler's release.
DRAIN_MARGIN_S = 5.0


class Runner(Protocol):
    """What the shell needs of the core (``worker_svc.model_runner.ModelRunner``)."""

    seqs: Sized

    def execute(self, plan: step_pb2.StepPlan) -> step_pb2.StepResult: ...

    def reset(self, replica_id: int, epoch: int) -> None: ...

    def warm_up(self) -> int: ...


class WorkerService:
    """One worker process's transport around a runner; ``serve`` blocks until it ends.

    Build it first (metrics, probes: ``/health`` answers while the weights load), then
    ``serve(runner, info)`` once the runner exists. ``stop()`` may be called from any
    thread or a signal handler: the step in hand finishes, then the worker drains.
    """

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.metrics = WorkerMetrics()
        self._stop = threading.Event()
        self._force = threading.Event()  # a second stop: leave without waiting
        self._link = Link(
            interval_s=settings.heartbeat_interval_s, timeout_s=settings.heartbeat_timeout_s
        )
        self._registered = False
        self._serving = False
        self._main_tick = time.monotonic()
        self._step_since: float | None = None
        self._heartbeat: Heartbeat | None = None
        self._probes: ProbeServer | None = None
        self._hello_due: float | None = None
        self._backoff_s = settings.hello_backoff_s

    # -- lifecycle ---------------------------------------------------------------------

    def start_probes(self) -> tuple[str, int]:
        """Serve the probes; returns the (host, port) bound (port 0 picks a free one)."""
        s = self.settings
        self._probes = ProbeServer(
            s.http_host, s.http_port, health=self.healthy, ready=self.ready,
            registry=self.metrics.registry,
        ).start()  # fmt: skip
        return s.http_host, self._probes.port

    def stop(self) -> None:
        """Ask the worker to finish its step, drain and exit (signal-safe: sets a flag);
        a second call ends the drain at once."""
        if self._stop.is_set():
            self._force.set()
        self._stop.set()

    def close(self) -> None:
        if self._probes is not None:
            self._probes.stop()
            self._probes = None

    def serve(self, runner: Runner, info: ModelInfo) -> int:
        """Register and run plans until stopped (0) or refused for good (1)."""
        s = self.settings
        self.metrics.kv_blocks.set(info.num_kv_blocks)
        self._warm_up(runner)
        ctx = zmq.Context()
        address = endpoint(s.scheduler)
        conn = Connection(ctx, address, f"{s.worker_id}/main")
        self._heartbeat = Heartbeat(ctx, address, f"{s.worker_id}/hb", self._link, s.worker_id)
        self._heartbeat.start()
        self._serving = True
        try:
            code = self._loop(conn, runner, info)
            if code == 0:
                self._drain(conn, runner)
            return code
        finally:
            self._serving = False
            self._heartbeat.stop()
            self._heartbeat.join(timeout=2)
            conn.close(linger_ms=s.linger_ms)
            ctx.term()
            self.close()

    def _warm_up(self, runner: Runner) -> None:
        """Warm the runner up before the Hello, so a registered replica steps at once."""
        worker_id = self.settings.worker_id
        kernels = getattr(runner, "kernels", "unknown")
        self.metrics.kernels.labels(kernels).set(1)
        log.info("worker %s warming up; kernels: %s", worker_id, kernels)
        start = time.monotonic()
        num_tokens = runner.warm_up()
        log.info(
            "worker %s warmed up in %.2fs (a prefill of %d tokens and a decode)",
            worker_id, time.monotonic() - start, num_tokens,
        )  # fmt: skip

    # -- probes --------------------------------------------------------------------------

    def healthy(self) -> bool:
        """Both loops come round (a step in hand counts as progress until STEP_HANG_S)."""
        if not self._serving:
            return True  # loading the weights, or shutting down
        now = time.monotonic()
        step_since = self._step_since
        if step_since is not None:
            main_ok = now - step_since < STEP_HANG_S
        else:
            main_ok = now - self._main_tick < LOOP_STALL_S
        hb = self._heartbeat
        return main_ok and hb is not None and now - hb.last_tick < LOOP_STALL_S

    def ready(self) -> bool:
        return self._registered and not self._stop.is_set()

    # -- the main loop -------------------------------------------------------------------

    def _loop(self, conn: Connection, runner: Runner, info: ModelInfo) -> int:
        self._hello_due = time.monotonic()
        while not self._stop.is_set():
            now = self._main_tick = time.monotonic()
            self._check_silence(runner, now)
            if self._hello_due is not None and now >= self._hello_due:
                self._send_hello(conn, info)
            sock, monitor = conn.sock, conn.monitor
            events = dict(conn.poller.poll(POLL_S * 1000))
            if monitor in events:
                self._check_connection(monitor, runner)
            if sock not in events:
                continue
            msg = parse(sock.recv_multipart())
            if msg is not None:
                code = self._handle(msg, sock, runner)
                if code is not None:
                    return code
        return 0

    def _check_silence(self, runner: Runner, now: float) -> None:
        """The heartbeat thread heard no answer for the timeout: the scheduler may be a new
        one that never heard of this worker (or answers nothing), so register again."""
        assert self._heartbeat is not None
        if self._heartbeat.silence.is_set():
            self._heartbeat.silence.clear()
            if not self._registered:
                return  # a Hello is already under way, and goes again until answered
            log.warning(
                "worker %s heard no heartbeat answer for %.1fs: saying hello again",
                self.settings.worker_id, self._link.timeout_s,
            )  # fmt: skip
            self._unregister(runner, hello_at=now)

    def _check_connection(self, monitor: zmq.Socket, runner: Runner) -> None:
        """A dropped connection: a restarted scheduler knows nothing of this worker (even if
        it answers heartbeats), so Hello again as soon as the DEALER has reconnected."""
        if dropped(monitor):
            log.warning(
                "worker %s lost its connection to the scheduler: saying hello again",
                self.settings.worker_id,
            )
            self._unregister(runner, hello_at=time.monotonic())

    def _handle(
        self, msg: step_pb2.SchedulerMessage, sock: zmq.Socket, runner: Runner
    ) -> int | None:
        kind = msg.WhichOneof("kind")
        if kind == "plan":
            self._send(sock, step_pb2.WorkerMessage(result=self._step(runner, msg.plan)))
        elif kind == "welcome":
            self._welcome(runner, msg.welcome)
        elif kind == "refusal":
            return self._refused(msg.refusal)
        elif kind == "reset":
            if self._stale(msg.reset):
                return None
            log.info(
                "worker %s reset by the scheduler: %s", self.settings.worker_id, msg.reset.reason
            )
            self._unregister(runner, hello_at=time.monotonic())
        elif kind != "heartbeat":  # answers belong to the heartbeat socket; ignore strays
            log.warning("worker %s ignores a message of kind %r", self.settings.worker_id, kind)
        return None

    def _step(self, runner: Runner, plan: step_pb2.StepPlan) -> step_pb2.StepResult:
        """Run one plan; an exception becomes an EXECUTION_FAILED result, never a dead worker."""
        m = self.metrics
        start = self._step_since = time.monotonic()
        m.step_running.set(1)
        try:
            result = runner.execute(plan)
        except Exception as exc:
            log.exception("worker %s: step %d failed", self.settings.worker_id, plan.step)
            result = _failed(plan, exc, time.monotonic() - start)
        finally:
            self._step_since = None
            m.step_running.set(0)
        m.running_sequences.set(len(runner.seqs))
        if result.error.kind:
            m.step_errors.labels(StepError.Kind.Name(result.error.kind)).inc()
            log.warning(
                "worker %s: step %d not run: %s %s", self.settings.worker_id, plan.step,
                StepError.Kind.Name(result.error.kind), result.error.detail,
            )  # fmt: skip
        else:
            self._link.last_step = plan.step
            m.steps.inc()
            m.step_seconds.observe(result.compute_seconds)
            m.tokens.inc(len(result.token_ids))
        return result

    # -- membership ----------------------------------------------------------------------

    def _send_hello(self, conn: Connection, info: ModelInfo) -> None:
        s = self.settings
        if conn.carried_hello:
            conn.renew()
        hello = step_pb2.Hello(
            protocol_version=PROTOCOL_VERSION,
            worker_id=s.worker_id,
            model_identity=info.identity,
            vocab_size=info.vocab_size,
            eos_token_ids=info.eos_token_ids,
            max_model_len=info.max_model_len,
            tp_rank=0,
            tp_size=1,
            num_kv_blocks=info.num_kv_blocks,
            block_size=info.block_size,
            dtype=info.dtype,
            device=info.device,
            shared_secret=s.shared_secret,
        )
        if self._send(conn.sock, step_pb2.WorkerMessage(hello=hello), quiet=True):
            conn.carried_hello = True
            # Sent is not received: a Hello that left just as a restarted scheduler was
            # not yet listening is lost without an error, so it goes again until a
            # Welcome or a Refusal answers it.
            self._hello_due = time.monotonic() + HELLO_ANSWER_WAIT_S
            log.info("worker %s sent hello to %s", s.worker_id, endpoint(s.scheduler))
        else:
            self._hello_due = time.monotonic() + HELLO_RESEND_S

    def _welcome(self, runner: Runner, welcome: step_pb2.Welcome) -> None:
        s, link, cfg = self.settings, self._link, welcome.config
        runner.reset(welcome.replica_id, welcome.epoch)
        link.replica_id, link.epoch, link.last_step = welcome.replica_id, welcome.epoch, 0
        if cfg.heartbeat_interval_ms:
            link.interval_s = cfg.heartbeat_interval_ms / 1000
        if cfg.heartbeat_timeout_ms:
            link.timeout_s = cfg.heartbeat_timeout_ms / 1000
        self._registered, self._hello_due, self._backoff_s = True, None, s.hello_backoff_s
        self.metrics.registered.set(1)
        self.metrics.running_sequences.set(0)
        host, port = s.http_host, self._probes.port if self._probes else s.http_port
        line = WORKER_REGISTERED.line(
            worker_id=s.worker_id, replica=welcome.replica_id, epoch=welcome.epoch,
            http=f"{host}:{port}",
        )  # fmt: skip
        log.info("%s", line)

    def _refused(self, refusal: step_pb2.Refusal) -> int | None:
        s = self.settings
        if refusal.fatal:
            log.error("worker %s refused by the scheduler: %s", s.worker_id, refusal.reason)
            return 1
        log.warning(
            "worker %s refused by the scheduler: %s (hello again in %.1fs)",
            s.worker_id, refusal.reason, self._backoff_s,
        )  # fmt: skip
        self._hello_due = time.monotonic() + self._backoff_s
        self._backoff_s = min(2 * self._backoff_s, s.hello_backoff_max_s)
        return None

    def _stale(self, reset: step_pb2.Reset) -> bool:
        """A Reset of a replica this worker no longer holds. A thawed worker (SIGSTOP)
        hears its own silence and says Hello; the Reset the scheduler sent for its old
        replica arrives after, and must not end the new one."""
        link = self._link
        if not reset.replica_id or (reset.replica_id, reset.epoch) == (link.replica_id, link.epoch):
            return False
        log.info(
            "worker %s ignores a reset of replica %d epoch %d (it holds %d epoch %d): %s",
            self.settings.worker_id, reset.replica_id, reset.epoch, link.replica_id,
            link.epoch, reset.reason,
        )  # fmt: skip
        return True

    def _unregister(self, runner: Runner, *, hello_at: float) -> None:
        """Forget the replica (epoch 0 matches no plan) and Hello again at ``hello_at``."""
        runner.reset(0, 0)
        link = self._link
        link.replica_id, link.epoch, link.last_step = 0, 0, 0
        self._registered = False
        self.metrics.registered.set(0)
        self.metrics.running_sequences.set(0)
        self._hello_due = hello_at

    def _drain(self, conn: Connection, runner: Runner) -> None:
        """Tell the scheduler, then run its plans until it releases this worker (a Reset),
        the grace period and a margin are over, it falls silent, or a second stop comes."""
        s, sock, monitor = self.settings, conn.sock, conn.monitor
        registered = self._registered
        grace_ms = round(s.drain_grace_s * 1000) if registered else 0
        drain = step_pb2.Drain(worker_id=s.worker_id, grace_ms=grace_ms)
        sent = self._send(sock, step_pb2.WorkerMessage(drain=drain), quiet=True)
        if not sent or not grace_ms:
            self._leave()
            why = "scheduler unreachable" if not sent else "nothing to hand back"
            log.info("worker %s draining (%s): exiting", s.worker_id, why)
            return
        log.info(
            "worker %s draining: running its sequences for up to %gs", s.worker_id, s.drain_grace_s
        )
        assert self._heartbeat is not None
        deadline = time.monotonic() + s.drain_grace_s + DRAIN_MARGIN_S
        poller = conn.poller
        why = f"no release within {s.drain_grace_s + DRAIN_MARGIN_S:g}s"
        while time.monotonic() < deadline:
            self._main_tick = time.monotonic()
            if self._force.is_set():
                why = "stopped again"
                break
            if self._heartbeat.silence.is_set():
                why = "the scheduler fell silent"
                break
            events = dict(poller.poll(POLL_S * 1000))
            if monitor in events and dropped(monitor):
                why = "the connection to the scheduler dropped"
                break
            if sock not in events:
                continue
            msg = parse(sock.recv_multipart())
            kind = msg.WhichOneof("kind") if msg is not None else None
            if kind == "plan":
                self._send(sock, step_pb2.WorkerMessage(result=self._step(runner, msg.plan)))
            elif kind == "reset" and not self._stale(msg.reset):
                why = f"released by the scheduler: {msg.reset.reason}"
                break
        self._leave()
        log.info("worker %s drained (%s): exiting", s.worker_id, why)

    def _leave(self) -> None:
        self._registered = False
        self.metrics.registered.set(0)

    def _send(self, sock: zmq.Socket, msg: step_pb2.WorkerMessage, *, quiet: bool = False) -> bool:
        """Send without blocking; False when no scheduler is connected (nothing is queued)."""
        try:
            sock.send(msg.SerializeToString(), zmq.NOBLOCK)
            return True
        except zmq.Again:
            if not quiet:
                log.warning(
                    "worker %s: no scheduler connected, %s dropped",
                    self.settings.worker_id, msg.WhichOneof("kind"),
                )  # fmt: skip
            return False


def _failed(plan: step_pb2.StepPlan, exc: Exception, seconds: float) -> step_pb2.StepResult:
    detail = f"{type(exc).__name__}: {exc}"
    return step_pb2.StepResult(
        replica_id=plan.replica_id,
        epoch=plan.epoch,
        step=plan.step,
        error=StepError(kind=StepError.EXECUTION_FAILED, detail=detail),
        compute_seconds=seconds,
    )
