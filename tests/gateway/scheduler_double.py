"""A deterministic stand-in for the scheduler's Session service, for the gateway's tests.

It speaks the real protocol (``session_pb2_grpc.SchedulerServicer`` on a grpc.aio
server) from a thread of its own, and answers every submit with scripted tokens: sample
``i`` produces ``scripts[i % len(scripts)]``, then EOS (or the script again, with
``ignore_eos``), one token per step, honouring ``max_tokens``, ``stop_token_ids``,
``abort`` and ``finish``. It records what the gateway sent, so tests can check that an
abort or a finish arrived, and can refuse submits (``reject``), say NOT_SERVING in its
gRPC health as a stalled scheduler does (``set_serving``), send a ``SchedulerLoad`` down
every open session (``send_load``), or be stopped and restarted on the same port.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pagoda.v1 import PROTOCOL_VERSION, common_pb2, session_pb2, session_pb2_grpc

# Server options that let the gateway's keepalive pings through.
SERVER_OPTIONS = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
)

HEALTH_SERVICE = "pagoda.v1.Scheduler"


@dataclass
class _Seq:
    request_id: str
    index: int
    prompt: list[int]
    sampling: common_pb2.SamplingParams
    produced: int = 0
    sent_prompt_logprobs: bool = False


@dataclass
class Record:
    """What the gateway sent, in order of arrival."""

    submits: list[session_pb2.Submit] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    finishes: list[tuple[str, int, int]] = field(default_factory=list)
    opens: list[session_pb2.OpenSession] = field(default_factory=list)


class SchedulerDouble(session_pb2_grpc.SchedulerServicer):
    """The Session service; ``start``/``stop`` run it on a background event loop."""

    def __init__(
        self,
        model: common_pb2.ModelInfo,
        scripts: list[list[int]],
        *,
        step_s: float = 0.004,
        protocol_version: int = PROTOCOL_VERSION,
    ) -> None:
        self.model = model
        self.scripts = scripts
        self.step_s = step_s
        self.protocol_version = protocol_version
        self.record = Record()
        # The next submit gets this answer instead of being queued (then it is reset).
        self.reject: session_pb2.Rejected | None = None
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: grpc.aio.Server | None = None
        self._sessions = itertools.count(1)
        self._health: health.aio.HealthServicer | None = None
        self._serving = True
        # The update queue of each open session, for send_load.
        self._open: set[asyncio.Queue[session_pb2.SchedulerUpdate | None]] = set()

    @property
    def vocab(self) -> int:
        return self.model.vocab_size

    # -- lifecycle (called from the test thread) ----------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> SchedulerDouble:
        self._call(self._start())
        return self

    def stop(self) -> None:
        self._call(self._stop())

    def set_serving(self, serving: bool) -> None:
        """What the health of ``pagoda.v1.Scheduler`` says (NOT_SERVING: a stalled engine)."""
        self._serving = serving
        self._call(self._publish_health())

    def send_load(self, **fields: float) -> None:
        """Send ``SchedulerLoad(**fields)`` down every open session."""
        update = session_pb2.SchedulerUpdate(load=session_pb2.SchedulerLoad(**fields))

        def put() -> None:
            for queue in self._open:
                queue.put_nowait(update)

        self._loop.call_soon_threadsafe(put)

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def wait_for(self, what: Callable[[Record], object], timeout: float = 5.0) -> object:
        """Poll the record until ``what`` is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = what(self.record)
            if value:
                return value
            time.sleep(0.005)
        raise AssertionError(f"the scheduler double never saw that within {timeout} s")

    def submit_with_prompt(self, prompt: list[int]) -> session_pb2.Submit | None:
        for submit in reversed(self.record.submits):
            if list(submit.prompt_token_ids) == prompt:
                return submit
        return None

    def _call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _start(self) -> None:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        session_pb2_grpc.add_SchedulerServicer_to_server(self, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self._server = server
        await self._publish_health()

    async def _publish_health(self) -> None:
        if self._health is None:
            return
        status = health_pb2.HealthCheckResponse
        await self._health.set(
            HEALTH_SERVICE, status.SERVING if self._serving else status.NOT_SERVING
        )

    async def _stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None

    # -- the service ---------------------------------------------------------------------

    async def Session(
        self,
        request_iterator: AsyncIterator[session_pb2.GatewayMessage],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[session_pb2.SchedulerUpdate]:
        first = await anext(request_iterator)
        self.record.opens.append(first.open)
        if first.open.protocol_version != self.protocol_version:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "protocol version")
        yield session_pb2.SchedulerUpdate(
            opened=session_pb2.SessionOpened(
                protocol_version=self.protocol_version,
                session_id=f"s{next(self._sessions)}",
                model=self.model,
            )
        )
        running: dict[tuple[str, int], _Seq] = {}
        pending_finished: list[session_pb2.SequenceFinished] = []
        updates: asyncio.Queue[session_pb2.SchedulerUpdate | None] = asyncio.Queue()
        reader = asyncio.ensure_future(
            self._read(request_iterator, running, pending_finished, updates)
        )
        stepper = asyncio.ensure_future(self._step(running, pending_finished, updates))
        self._open.add(updates)
        try:
            while (update := await updates.get()) is not None:
                yield update
        finally:
            self._open.discard(updates)
            reader.cancel()
            stepper.cancel()

    async def _read(
        self,
        messages: AsyncIterator[session_pb2.GatewayMessage],
        running: dict[tuple[str, int], _Seq],
        pending_finished: list[session_pb2.SequenceFinished],
        updates: asyncio.Queue[session_pb2.SchedulerUpdate | None],
    ) -> None:
        try:
            async for message in messages:
                kind = message.WhichOneof("kind")
                if kind == "submit":
                    self._submit(message.submit, running, updates)
                elif kind == "abort":
                    self.record.aborts.append(message.abort.request_id)
                    for key in [k for k in running if k[0] == message.abort.request_id]:
                        del running[key]
                elif kind == "finish":
                    fin = message.finish
                    self.record.finishes.append((fin.request_id, fin.index, fin.reason))
                    seq = running.pop((fin.request_id, fin.index), None)
                    if seq is not None:
                        pending_finished.append(_finished(seq, fin.reason))
        finally:
            updates.put_nowait(None)

    def _submit(
        self,
        submit: session_pb2.Submit,
        running: dict[tuple[str, int], _Seq],
        updates: asyncio.Queue[session_pb2.SchedulerUpdate | None],
    ) -> None:
        self.record.submits.append(submit)
        if self.reject is not None:
            rejected = session_pb2.Rejected()
            rejected.CopyFrom(self.reject)
            rejected.request_id = submit.request_id
            self.reject = None
            updates.put_nowait(session_pb2.SchedulerUpdate(rejected=rejected))
            return
        for index in range(submit.sampling.n or 1):
            key = (submit.request_id, index)
            running[key] = _Seq(
                submit.request_id, index, list(submit.prompt_token_ids), submit.sampling
            )

    async def _step(
        self,
        running: dict[tuple[str, int], _Seq],
        pending_finished: list[session_pb2.SequenceFinished],
        updates: asyncio.Queue[session_pb2.SchedulerUpdate | None],
    ) -> None:
        while True:
            await asyncio.sleep(self.step_s)
            outputs = session_pb2.StepOutputs()
            outputs.finished.extend(pending_finished)
            pending_finished.clear()
            for key, seq in list(running.items()):
                token, reason, stop_id = self._next_token(seq)
                outputs.request_ids.append(seq.request_id)
                outputs.indices.append(seq.index)
                outputs.token_ids.append(token)
                self._logprobs(seq, token, outputs)
                if reason:
                    del running[key]
                    outputs.finished.append(_finished(seq, reason, stop_id))
            if outputs.request_ids or outputs.finished:
                updates.put_nowait(session_pb2.SchedulerUpdate(outputs=outputs))

    def _next_token(self, seq: _Seq) -> tuple[int, int, int | None]:
        script = self.scripts[seq.index % len(self.scripts)]
        params = seq.sampling
        eos = self.model.eos_token_ids[0]
        position = seq.produced
        if position < len(script) or params.ignore_eos:
            token = script[position % len(script)]
        else:
            token = eos
        seq.produced += 1
        if token in params.stop_token_ids:
            return token, common_pb2.FINISH_REASON_STOP, token
        if token == eos and not params.ignore_eos:
            return token, common_pb2.FINISH_REASON_STOP, token
        limit = params.max_tokens if params.HasField("max_tokens") else None
        if (limit is not None and seq.produced >= limit) or (
            len(seq.prompt) + seq.produced >= self.model.max_model_len
        ):
            return token, common_pb2.FINISH_REASON_LENGTH, None
        return token, 0, None

    def _logprobs(self, seq: _Seq, token: int, outputs: session_pb2.StepOutputs) -> None:
        params = seq.sampling
        if not params.HasField("logprobs") and not params.HasField("prompt_logprobs"):
            return
        delta = session_pb2.DeltaLogprobs(request_id=seq.request_id, index=seq.index)
        if params.HasField("logprobs"):
            delta.tokens.append(fake_logprobs(token, seq.produced, params.logprobs, self.vocab))
        if params.HasField("prompt_logprobs") and not seq.sent_prompt_logprobs:
            seq.sent_prompt_logprobs = True
            delta.prompt.extend(
                fake_logprobs(t, i, params.prompt_logprobs, self.vocab)
                for i, t in enumerate(seq.prompt[1:])
            )
        outputs.logprobs.append(delta)


def fake_logprobs(token: int, position: int, top: int, vocab: int) -> common_pb2.TokenLogprobs:
    """Deterministic logprobs: the token is the most likely, its neighbours follow."""
    value = -0.25 * (position % 4 + 1)
    tops = [(token + k) % vocab for k in range(top)]
    return common_pb2.TokenLogprobs(
        token_id=token,
        logprob=value,
        rank=1,
        top_token_ids=tops,
        top_logprobs=[value - k for k in range(top)],
    )


def _finished(seq: _Seq, reason: int, stop_id: int | None = None) -> session_pb2.SequenceFinished:
    return session_pb2.SequenceFinished(
        request_id=seq.request_id,
        index=seq.index,
        reason=reason,
        stop_token_id=stop_id,
        num_prompt_tokens=len(seq.prompt),
        num_cached_tokens=min(len(seq.prompt) - 1, 16),
        num_generated_tokens=seq.produced,
    )
