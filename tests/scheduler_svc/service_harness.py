"""Real-socket clients for the scheduler service: a worker and a gateway session.

``StepWorker`` is a worker made of ZeroMQ DEALER sockets and the real
``worker_svc.model_runner.ModelRunner``, in threads of its own, with switches for the
faults the tests need (a corrupted step, a hang, a silent death). ``GatewaySession``
is a grpc.aio client of ``Scheduler.Session``. ``running_service`` runs the service
in the test's event loop on ephemeral ports.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import zmq

from pagoda.model_card.card import ModelCard
from pagoda.sampling_params import SamplingParams
from pagoda.v1 import PROTOCOL_VERSION, session_pb2, session_pb2_grpc, step_pb2
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.service import Addresses, SchedulerService
from scheduler_svc.settings import ServiceSettings
from tests.worker_svc.hf_oracle import VOCAB_SIZE, random_prompts

TEST_TIMEOUT_S = 60.0


def asynctest(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test function (with its fixtures) on a fresh event loop."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), TEST_TIMEOUT_S))

    return wrapper


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


# -- the service -----------------------------------------------------------------------------


@dataclass
class Running:
    service: SchedulerService
    addresses: Addresses
    channel: grpc.aio.Channel

    @property
    def step_address(self) -> str:
        return f"tcp://127.0.0.1:{self.addresses.step_port}"

    @property
    def stub(self) -> session_pb2_grpc.SchedulerStub:
        return session_pb2_grpc.SchedulerStub(self.channel)

    async def stats(self) -> session_pb2.StatsResponse:
        return await self.stub.Stats(session_pb2.StatsRequest())

    async def session(self, gateway_id: str = "test-gateway") -> GatewaySession:
        session = GatewaySession(self.stub)
        await session.open(gateway_id)
        return session


FAST_SETTINGS = ServiceSettings(
    grpc_port=0,
    step_port=0,
    http_port=0,
    heartbeat_interval_ms=100,
    heartbeat_timeout_ms=1000,
    step_timeout_s=10.0,
    stall_timeout_s=5.0,
    drain_grace_s=5.0,
)


def scheduler_config(card: ModelCard, **overrides: Any) -> SchedulerConfig:
    base: dict[str, Any] = dict(
        max_model_len=card.max_model_len,
        block_size=16,
        max_num_batched_tokens=2048,
        max_num_seqs=64,
        eos_token_ids=card.eos_token_ids,
        vocab_size=card.vocab_size,
        seed=0,
    )
    base.update(overrides)
    return SchedulerConfig(**base)


@asynccontextmanager
async def running_service(
    card: ModelCard, settings: ServiceSettings = FAST_SETTINGS, **config: Any
) -> AsyncIterator[Running]:
    service = SchedulerService(card, scheduler_config(card, **config), settings)
    addresses = await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{addresses.grpc_port}")
    try:
        yield Running(service, addresses, channel)
    finally:
        await channel.close()
        await service.close()


# -- the gateway side -----------------------------------------------------------------------


@dataclass
class GatewaySession:
    """One Session stream, collecting what comes down per (request id, sample index)."""

    stub: session_pb2_grpc.SchedulerStub
    tokens: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    finished: dict[tuple[str, int], session_pb2.SequenceFinished] = field(default_factory=dict)
    rejected: dict[str, session_pb2.Rejected] = field(default_factory=dict)
    # Every SchedulerLoad that came down, in order.
    loads: list[session_pb2.SchedulerLoad] = field(default_factory=list)
    opened: session_pb2.SessionOpened | None = None
    error: grpc.aio.AioRpcError | None = None
    ended: bool = False
    call: Any = None
    _reader: asyncio.Task[None] | None = None

    async def open(
        self, gateway_id: str, version: int = PROTOCOL_VERSION, read: bool = True
    ) -> None:
        self.call = self.stub.Session()
        open_ = session_pb2.OpenSession(protocol_version=version, gateway_id=gateway_id)
        await self.call.write(session_pb2.GatewayMessage(open=open_))
        first = await self.call.read()
        assert first.WhichOneof("kind") == "opened", first
        self.opened = first.opened
        if read:
            self._reader = asyncio.create_task(self._read())

    async def submit(
        self, request_id: str, prompt: list[int], params: SamplingParams, **fields: Any
    ) -> None:
        submit = session_pb2.Submit(
            request_id=request_id, prompt_token_ids=prompt, sampling=params.to_proto(), **fields
        )
        await self.call.write(session_pb2.GatewayMessage(submit=submit))

    async def abort(self, request_id: str) -> None:
        await self.call.write(
            session_pb2.GatewayMessage(abort=session_pb2.Abort(request_id=request_id))
        )

    async def finish(self, request_id: str, index: int) -> None:
        finish = session_pb2.FinishSequence(request_id=request_id, index=index)
        await self.call.write(session_pb2.GatewayMessage(finish=finish))

    async def wait_finished(self, request_id: str, n: int = 1, timeout: float = 20.0) -> None:
        """Until every sample of the request has finished; fails if the session ends first.
        (A session may end right after its last record, as a draining scheduler's does:
        that is not a failure.)"""

        def done() -> bool:
            return all((request_id, i) in self.finished for i in range(n))

        await wait_until(lambda: done() or self.ended, timeout, f"{request_id} to finish")
        assert done(), f"the session ended first: {self.error}"

    def output(self, request_id: str, index: int = 0) -> list[int]:
        return self.tokens.get((request_id, index), [])

    def cancel(self) -> None:
        self.call.cancel()

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self) -> None:
        try:
            while (update := await self.call.read()) is not grpc.aio.EOF:
                self._apply(update)
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        except asyncio.CancelledError:
            pass
        self.ended = True

    def _apply(self, update: session_pb2.SchedulerUpdate) -> None:
        kind = update.WhichOneof("kind")
        if kind == "rejected":
            self.rejected[update.rejected.request_id] = update.rejected
            return
        if kind == "load":
            self.loads.append(update.load)
            return
        assert kind == "outputs", kind
        out = update.outputs
        for rid, index, token in zip(out.request_ids, out.indices, out.token_ids, strict=True):
            assert (rid, index) not in self.finished, f"a token after the end of {rid}/{index}"
            self.tokens.setdefault((rid, index), []).append(token)
        for fin in out.finished:
            assert (fin.request_id, fin.index) not in self.finished, f"{fin.request_id} twice"
            self.finished[(fin.request_id, fin.index)] = fin


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


# -- the worker side ------------------------------------------------------------------------


@dataclass
class HelloFields:
    """What a StepWorker claims in its Hello; tests change one field to be refused."""

    model_identity: str
    num_kv_blocks: int
    max_model_len: int
    block_size: int = 16
    shared_secret: str = ""
    protocol_version: int = PROTOCOL_VERSION


class StepWorker:
    """A worker: a main DEALER running plans on a real ModelRunner and a heartbeat DEALER.

    Switches: ``corrupt_next_step`` (the runner then sees a step gap and refuses it),
    ``hang`` / ``resume`` (the main loop stops reading; heartbeats go on), ``drain``
    (Drain without a grace period, then both stop), ``drain(grace_ms)`` (Drain with one:
    it keeps running plans until a Reset releases it, then both stop, as the worker does
    on SIGTERM), ``kill`` (both stop, silently, as a crashed process would).
    """

    def __init__(
        self,
        address: str,
        runner: Any,
        worker_id: str,
        hello: HelloFields,
        step_delay_s: float = 0.0,
    ):
        self.address, self.runner, self.worker_id = address, runner, worker_id
        self.hello = hello
        self.step_delay_s = step_delay_s
        self.welcomes: list[step_pb2.Welcome] = []
        self.refusals: list[step_pb2.Refusal] = []
        self.resets: list[step_pb2.Reset] = []
        self.steps_run = 0
        self.new_sequences = 0
        self.heartbeat_answers = 0
        self.corrupt_next_step = False
        self._hanging = threading.Event()
        self._draining = threading.Event()
        self._drain_grace_ms = 0
        self._drain_sent = False
        self.released = threading.Event()  # the Reset that ended a graceful drain came
        self._halt = threading.Event()
        self._halt_beats = threading.Event()
        self._replica = (0, 0)
        self._ctx = zmq.Context()
        self._threads = [
            threading.Thread(target=self._main, name=f"{worker_id}-main", daemon=True),
            threading.Thread(target=self._beat, name=f"{worker_id}-hb", daemon=True),
        ]

    @classmethod
    def for_runner(cls, address: str, runner: Any, card: ModelCard, worker_id: str, **kw: Any):
        fields = HelloFields(card.identity, runner.num_kv_blocks, runner.max_model_len)
        overrides = {k: kw.pop(k) for k in list(kw) if k in HelloFields.__dataclass_fields__}
        return cls(address, runner, worker_id, replace(fields, **overrides), **kw)

    def start(self) -> StepWorker:
        for thread in self._threads:
            thread.start()
        return self

    def hang(self) -> None:
        self._hanging.set()

    def resume(self) -> None:
        self._hanging.clear()

    def drain(self, grace_ms: int = 0) -> None:
        self._drain_grace_ms = grace_ms
        self._draining.set()
        if not grace_ms:
            self._threads[0].join(timeout=10)

    def kill(self) -> None:
        if self._halt.is_set():
            return
        self._halt_beats.set()
        self._halt.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._ctx.term()

    stop = kill

    @property
    def registered(self) -> bool:
        return bool(self.welcomes) and self._replica != (0, 0)

    # -- threads --

    def _socket(self, suffix: str) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"{self.worker_id}/{suffix}".encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        return sock

    def _main(self) -> None:
        sock = self._socket("main")
        try:
            self._send_hello(sock)
            while not self._halt.is_set():
                if self._draining.is_set() and not self._drain_sent:
                    grace = self._drain_grace_ms
                    drain = step_pb2.Drain(worker_id=self.worker_id, grace_ms=grace)
                    sock.send(step_pb2.WorkerMessage(drain=drain).SerializeToString())
                    self._drain_sent = True
                    if not grace:
                        self._halt_beats.set()
                        break
                if self._hanging.is_set() or not sock.poll(20):
                    time.sleep(0.01 if self._hanging.is_set() else 0)
                    continue
                msg = step_pb2.SchedulerMessage.FromString(sock.recv())
                if not self._handle(sock, msg):
                    break
        finally:
            sock.close(linger=0)

    def _send_hello(self, sock: zmq.Socket) -> None:
        h = self.hello
        hello = step_pb2.Hello(
            protocol_version=h.protocol_version,
            worker_id=self.worker_id,
            model_identity=h.model_identity,
            max_model_len=h.max_model_len,
            tp_size=1,
            num_kv_blocks=h.num_kv_blocks,
            block_size=h.block_size,
            dtype="float32",
            device="cpu",
            shared_secret=h.shared_secret,
        )
        sock.send(step_pb2.WorkerMessage(hello=hello).SerializeToString())

    def _handle(self, sock: zmq.Socket, msg: step_pb2.SchedulerMessage) -> bool:
        kind = msg.WhichOneof("kind")
        if kind == "welcome":
            self.runner.reset(msg.welcome.replica_id, msg.welcome.epoch)
            self._replica = (msg.welcome.replica_id, msg.welcome.epoch)
            self.welcomes.append(msg.welcome)
        elif kind == "refusal":
            self.refusals.append(msg.refusal)
            return not msg.refusal.fatal
        elif kind == "reset":
            self.resets.append(msg.reset)
            if self._drain_sent:  # released: the worker exits
                self._halt_beats.set()
                self.released.set()
                return False
            self.runner.reset(0, 0)
            self._replica = (0, 0)
            self._send_hello(sock)
        elif kind == "plan":
            plan = msg.plan
            if self.corrupt_next_step:
                self.corrupt_next_step = False
                self.runner.last_step += 1  # as if a plan was lost: the runner sees a gap
            self.new_sequences += len(plan.new_sequences)
            result = self.runner.execute(plan)
            if self.step_delay_s:
                time.sleep(self.step_delay_s)
            self.steps_run += 1
            sock.send(step_pb2.WorkerMessage(result=result).SerializeToString())
        return True

    def _beat(self) -> None:
        sock = self._socket("hb")
        try:
            while not self._halt_beats.is_set():
                interval = (
                    self.welcomes[-1].config.heartbeat_interval_ms / 1000 if self.welcomes else 0.1
                )
                rid, epoch = self._replica
                beat = step_pb2.Heartbeat(worker_id=self.worker_id, replica_id=rid, epoch=epoch)
                sock.send(step_pb2.WorkerMessage(heartbeat=beat).SerializeToString())
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0 and not self._halt_beats.is_set():
                    if sock.poll(min(left, 0.05) * 1000):
                        sock.recv()
                        self.heartbeat_answers += 1
        finally:
            sock.close(linger=0)


# KV blocks of each runner the service tests share (tests/scheduler_svc/conftest.py).
KV_BLOCKS = 64


def prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    return random_prompts(VOCAB_SIZE, lengths, seed)


def worker(running, runner, card, worker_id: str, **kw) -> StepWorker:
    return StepWorker.for_runner(running.step_address, runner, card, worker_id, **kw).start()


def http_get(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
        return reply.status, reply.read().decode()


async def scrape(running) -> str:
    return (await asyncio.to_thread(http_get, running.addresses.http_port, "/metrics"))[1]
