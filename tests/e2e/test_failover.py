"""Failover with real processes: workers that join, die (kill -9), freeze (SIGSTOP) or
are missing, and a scheduler that restarts, while greedy streams run through them.

One scheduler (``--heartbeat-timeout-ms 1500`` keeps deaths quick to notice), one
gateway and workers started and killed one by one serve the tiny random Llama in fp32.
Every stream is a gRPC ``Generate`` of token ids with ``ignore_eos``, so its output is
known in advance: the offline ``pagoda.LLM`` computes each one up front, uninterrupted,
and a stream must deliver exactly those tokens — full length, none twice (the streamed
pieces concatenate to the offline text) — whatever happened to the replica it ran on.
Where the two first differ, the near-tie rule of tests/worker_svc/hf_oracle.py decides
(a recomputed prefix may round differently from the decode steps that built it).

The tests share one stack and run in file order, each leaving the workers it needs
next; each starts what it needs itself when run alone.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.v1 import api_pb2, api_pb2_grpc, common_pb2, session_pb2
from tests.e2e.stack import Gateway, Scheduler, Worker, free_port, tiny_model
from tests.worker_svc.hf_oracle import VOCAB_SIZE, assert_matches_reference, hf_greedy

MAX_MODEL_LEN = 512
SCHEDULER_FLAGS = [
    "--max-model-len", str(MAX_MODEL_LEN), "--seed", "0",
    "--heartbeat-interval-ms", "300", "--heartbeat-timeout-ms", "1500",
]  # fmt: skip
WORKER_FLAGS = ["--kv-cache-memory", "64MiB", "--threads", "1"]
ACTIVE, DEAD = session_pb2.ReplicaStats.ACTIVE, session_pb2.ReplicaStats.DEAD
LENGTH = common_pb2.FINISH_REASON_LENGTH

# The prompt sets: (number of prompts, fewest and most tokens to generate). Every
# prompt is drawn at random, so no two share a prefix-cache block and none is cached
# anywhere before its test sends it ("load" prompts are sent again and again, with
# lengths that differ so that the load never ends all at once). The longest take a
# second or more: long enough to be half-way when a worker dies.
PROMPT_SETS = {
    "wait": (2, 24, 24),
    "load": (64, 24, 96),
    "joined": (16, 48, 48),
    "kill": (16, 300, 300),
    "stop": (16, 300, 300),
    "restarted": (4, 24, 24),
}
LOAD_STREAMS = 32


@dataclass(frozen=True)
class Expected:
    """The offline engine's uninterrupted greedy answer to one prompt."""

    prompt: list[int]
    token_ids: list[int]
    text: str


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("e2e-failover"))


@pytest.fixture(scope="module")
def expected(model: Path) -> dict[str, list[Expected]]:
    """Every prompt set's offline answers, computed once in one batch."""
    rng = random.Random(7)
    names, prompts, params = [], [], []
    for name, (count, fewest, most) in PROMPT_SETS.items():
        for _ in range(count):
            names.append(name)
            prompts.append([rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randrange(6, 20))])
            max_tokens = rng.randint(fewest, most)
            params.append(SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    offline = LLM(model, dtype="float32", max_model_len=MAX_MODEL_LEN, show_progress=False,
                  kv_cache_memory=64 * 2**20)  # fmt: skip
    # One thread: a model this small runs many times slower on two threads than on one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batch = [{"prompt_token_ids": p} for p in prompts]
        outputs = offline.generate(batch, params, use_tqdm=False)
    finally:
        torch.set_num_threads(threads)
    by_set: dict[str, list[Expected]] = {name: [] for name in PROMPT_SETS}
    for name, prompt, out in zip(names, prompts, outputs, strict=True):
        first = out.outputs[0]
        by_set[name].append(Expected(prompt, list(first.token_ids), first.text))
    return by_set


class Cluster:
    """The scheduler (on fixed ports, so a restarted one is found again), the gateway,
    and the workers started so far."""

    def __init__(self, model: Path) -> None:
        self.model = model
        self.grpc_port, self.step_port = free_port(), free_port()
        self.scheduler = self.start_scheduler()
        self.gateway = Gateway(model, self.scheduler.grpc_addr)
        self.workers: list[Worker] = []
        self._names = iter(f"worker-{i}" for i in range(1, 100))

    def start_scheduler(self) -> Scheduler:
        flags = [*SCHEDULER_FLAGS, "--step-port", str(self.step_port)]
        return Scheduler(self.model, grpc_port=self.grpc_port, extra=flags)

    @property
    def live(self) -> list[Worker]:
        return [w for w in self.workers if w.proc.poll() is None]

    def add_worker(self) -> Worker:
        worker = Worker(self.model, self.scheduler.step_addr, next(self._names), WORKER_FLAGS)
        self.workers.append(worker)
        return worker

    def ensure_workers(self, count: int) -> list[Worker]:
        """At least ``count`` live workers (those running now first), and every one
        registered with the current scheduler."""
        while len(self.live) < count:
            self.add_worker()
        registered = lambda: len(active(self.scheduler.stats())) >= count  # noqa: E731
        wait_until(registered, 30, "registrations", self)
        return self.live

    def logs(self) -> str:
        """The recent log lines of every process, for a failure's message."""
        processes = (self.scheduler, self.gateway, *self.workers)
        return "".join(f"\n--- {p.name}:\n{''.join(p.lines[-25:])}" for p in processes)

    def close(self) -> None:
        for process in (self.gateway, *self.workers, self.scheduler):
            process.kill()


@pytest.fixture(scope="module")
def cluster(model: Path) -> Iterator[Cluster]:
    cluster = Cluster(model)
    yield cluster
    cluster.close()


@pytest.fixture
def stub(cluster: Cluster) -> Iterator[api_pb2_grpc.GenerationStub]:
    with grpc.insecure_channel(cluster.gateway.grpc_addr) as channel:
        yield api_pb2_grpc.GenerationStub(channel)


# -- streams -------------------------------------------------------------------------------


@dataclass(eq=False)
class Stream:
    """One gRPC ``Generate`` of token ids, read on a thread of its own."""

    want: Expected
    tokens: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    finish: int = 0
    error: grpc.RpcError | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def start(self, stub: api_pb2_grpc.GenerationStub) -> Stream:
        threading.Thread(target=self._read, args=(stub,), daemon=True).start()
        return self

    def _read(self, stub: api_pb2_grpc.GenerationStub) -> None:
        sampling = common_pb2.SamplingParams(
            temperature=0.0, max_tokens=len(self.want.token_ids), ignore_eos=True
        )
        request = api_pb2.GenerateRequest(
            token_ids=api_pb2.TokenIds(ids=self.want.prompt), sampling=sampling,
            return_token_ids=True,
        )  # fmt: skip
        try:
            for response in stub.Generate(request, timeout=120):
                for choice in response.choices:
                    self.tokens.extend(choice.token_ids)
                    self.pieces.append(choice.text)
                    self.finish = choice.finish_reason or self.finish
                self.arrivals.append(time.monotonic())
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.done.set()

    @property
    def longest_pause(self) -> float:
        gaps = [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]
        return max(gaps, default=0.0)


def start_streams(
    stub: api_pb2_grpc.GenerationStub, wants: list[Expected], gap_s: float = 0.0
) -> list[Stream]:
    """One stream per prompt, ``gap_s`` apart (so that idle replicas take some)."""
    streams = []
    for want in wants:
        streams.append(Stream(want).start(stub))
        time.sleep(gap_s)
    return streams


class ClosedLoop:
    """``streams`` clients, each sending its next prompt as soon as its last one ended,
    until ``stop()``: a load that lasts as long as the test needs it."""

    def __init__(self, stub: api_pb2_grpc.GenerationStub, wants: list[Expected], streams: int):
        self.done: list[Stream] = []
        self._wants = wants
        self._next = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(stub,), daemon=True) for _ in range(streams)
        ]
        for thread in self._threads:
            thread.start()

    def _client(self, stub: api_pb2_grpc.GenerationStub) -> None:
        while not self._stopping.is_set():
            with self._lock:
                want = self._wants[self._next % len(self._wants)]
                self._next += 1
            stream = Stream(want)
            stream._read(stub)
            with self._lock:
                self.done.append(stream)

    def stop(self, within: float = 60.0) -> list[Stream]:
        """Send nothing more; every stream sent, once ended."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(within)
        return self.done


def finish_all(streams: list[Stream], within: float = 90.0) -> None:
    deadline = time.monotonic() + within
    for stream in streams:
        assert stream.done.wait(max(0.0, deadline - time.monotonic())), "a stream never ended"


def assert_uninterrupted(model: Path, streams: list[Stream]) -> None:
    """Each stream delivered its offline answer exactly: every token once, full length,
    the same text; a first difference must be a near-tie (then nothing after it counts)."""
    for i, stream in enumerate(streams):
        want = stream.want
        assert stream.error is None, f"stream {i} failed: {stream.error}"
        assert stream.finish == LENGTH, (
            f"stream {i} ended with finish reason {stream.finish} after {len(stream.tokens)} "
            f"of {len(want.token_ids)} tokens"
        )
        assert len(stream.tokens) == len(want.token_ids), (
            f"stream {i}: {len(stream.tokens)} tokens streamed, {len(want.token_ids)} expected"
        )
        if stream.tokens == want.token_ids:
            assert "".join(stream.pieces) == want.text, f"stream {i}: text differs"
            continue
        [ref] = hf_greedy(model, [want.prompt], len(want.token_ids))
        assert_matches_reference(stream.tokens, ref, f"stream {i}")


# -- the scheduler's view ------------------------------------------------------------------


def wait_until(
    check: Callable[[], object], within: float, what: str, cluster: Cluster | None = None
) -> None:
    """Poll ``check`` until it is truthy; on failure, show the cluster's logs."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            logs = cluster.logs() if cluster is not None else ""
            raise AssertionError(f"no {what} within {within} s{logs}")
        time.sleep(0.05)


def active(stats: session_pb2.StatsResponse) -> dict[int, session_pb2.ReplicaStats]:
    return {r.replica_id: r for r in stats.replicas if r.state == ACTIVE}


def registrations(worker: Worker, after: int = 0) -> list[int]:
    """The replica ids ``worker`` logged registering as, after its line ``after``."""
    pattern = re.compile(r"registered replica=(\d+)")
    return [int(m.group(1)) for line in worker.lines[after:] if (m := pattern.search(line))]


def replica_of(worker: Worker) -> int:
    """The replica id of ``worker``'s latest registration."""
    found = registrations(worker)
    assert found, f"{worker.name} has not registered:\n{worker.log}"
    return found[-1]


def wait_until_idle(scheduler: Scheduler, within: float = 20.0) -> session_pb2.StatsResponse:
    """Stats once nothing runs or waits and no live replica holds a KV block."""
    last: list[session_pb2.StatsResponse] = []

    def idle() -> bool:
        stats = scheduler.stats()
        last[:] = [stats]
        busy = stats.num_running or stats.num_waiting
        held = [
            r for r in active(stats).values() if r.kv_usage or r.num_free_blocks != r.num_blocks
        ]
        return not busy and not held

    wait_until(idle, within, f"idle scheduler (last: {last})")
    return last[0]


def running_on(scheduler: Scheduler, replica: int) -> int:
    entry = active(scheduler.stats()).get(replica)
    return entry.num_running if entry is not None else 0


def mid_way(streams: list[Stream], tokens: int = 2) -> bool:
    """Every stream has produced some tokens and none has finished."""
    return all(tokens <= len(s.tokens) and not s.done.is_set() for s in streams)


# -- the scenarios -------------------------------------------------------------------------


def test_without_a_worker_a_request_waits_and_completes_once_one_joins(
    cluster: Cluster, stub: api_pb2_grpc.GenerationStub, expected: dict[str, list[Expected]]
) -> None:
    for worker in cluster.live:  # alone or first: no worker at all
        worker.kill()
    waiting_stream, whole = expected["wait"]
    stream = Stream(waiting_stream).start(stub)
    rest: dict[str, httpx.Response] = {}
    body = {"prompt": whole.prompt, "max_tokens": len(whole.token_ids), "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    url = f"{cluster.gateway.base_url}/v1/completions"
    poster = threading.Thread(target=lambda: rest.update(r=httpx.post(url, json=body, timeout=90)))
    poster.start()
    wait_until(lambda: cluster.scheduler.stats().num_waiting == 2, 10, "queued requests")
    time.sleep(1.0)
    assert not stream.done.is_set() and "r" not in rest, "a request failed without a worker"
    assert httpx.get(f"{cluster.gateway.base_url}/ready").status_code == 200
    assert cluster.scheduler.stats().num_waiting == 2
    cluster.ensure_workers(1)
    finish_all([stream])
    poster.join(60)
    assert_uninterrupted(cluster.model, [stream])
    answer = rest["r"]
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == whole.text


def test_scale_out_under_load(
    cluster: Cluster, stub: api_pb2_grpc.GenerationStub, expected: dict[str, list[Expected]]
) -> None:
    while len(cluster.live) > 1:
        cluster.live[-1].kill()
    [first] = cluster.ensure_workers(1)
    first_replica = replica_of(first)
    load = ClosedLoop(stub, expected["load"], LOAD_STREAMS)
    try:
        full = lambda: running_on(cluster.scheduler, first_replica) == LOAD_STREAMS  # noqa: E731
        wait_until(full, 10, f"{LOAD_STREAMS} running")
        second = cluster.add_worker()
        second_replica = replica_of(second)
        before = active(cluster.scheduler.stats())
        assert second_replica in before
        joined = start_streams(stub, expected["joined"], gap_s=0.02)

        def both_took_work() -> bool:
            now = active(cluster.scheduler.stats())
            grew = all(now[r].steps > before[r].steps for r in (first_replica, second_replica))
            return grew and now[first_replica].num_running > 0 < now[second_replica].num_running

        wait_until(both_took_work, 10, "work on both replicas")
        finish_all(joined)
    finally:
        streams = load.stop()
    assert len(streams) > LOAD_STREAMS
    assert_uninterrupted(cluster.model, streams + joined)
    wait_until_idle(cluster.scheduler)


def test_kill_9_of_a_worker_loses_no_stream_and_repeats_no_token(
    cluster: Cluster, stub: api_pb2_grpc.GenerationStub, expected: dict[str, list[Expected]]
) -> None:
    workers = cluster.ensure_workers(2)[:2]
    replicas = {replica_of(w): w for w in workers}
    streams = start_streams(stub, expected["kill"], gap_s=0.005)
    wait_until(lambda: mid_way(streams), 20, "tokens on every stream")
    load = {r: running_on(cluster.scheduler, r) for r in replicas}
    victim_replica = max(load, key=lambda r: load[r])
    assert load[victim_replica] > 0 and mid_way(streams)
    replicas[victim_replica].kill()
    finish_all(streams)
    assert_uninterrupted(cluster.model, streams)
    stats = wait_until_idle(cluster.scheduler)
    assert {r.replica_id: r.state for r in stats.replicas}[victim_replica] == DEAD
    # The streams paused while the death was noticed, and went on elsewhere.
    assert max(s.longest_pause for s in streams) < 15


def test_a_frozen_worker_is_replaced_and_rejoins_as_a_new_replica(
    cluster: Cluster, stub: api_pb2_grpc.GenerationStub, expected: dict[str, list[Expected]]
) -> None:
    workers = cluster.ensure_workers(2)[:2]
    replicas = {replica_of(w): w for w in workers}
    streams = start_streams(stub, expected["stop"], gap_s=0.005)
    wait_until(lambda: mid_way(streams), 20, "tokens on every stream")
    load = {r: running_on(cluster.scheduler, r) for r in replicas}
    old = max(load, key=lambda r: load[r])
    frozen = replicas[old]
    assert load[old] > 0 and mid_way(streams)
    seen = len(frozen.lines)

    def state_of_old() -> int:
        return {r.replica_id: r.state for r in cluster.scheduler.stats().replicas}.get(old, 0)

    os.killpg(frozen.proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: state_of_old() == DEAD, 10, f"replica {old} declared dead", cluster)
        assert not all(s.done.is_set() for s in streams)
        # Every stream ends while the worker is still frozen: its sequences moved.
        finish_all(streams)
    finally:
        os.killpg(frozen.proc.pid, signal.SIGCONT)
    assert_uninterrupted(cluster.model, streams)
    wait_until(lambda: registrations(frozen, seen), 20, "a new registration", cluster)
    stats = wait_until_idle(cluster.scheduler)
    # Exactly once: the thawed worker hears its own heartbeat silence and gets a Reset
    # for its old replica, but only one of them makes it say Hello (a Reset names the
    # replica it ends; silence adds no Hello to one under way).
    rejoined = registrations(frozen, seen)
    assert len(rejoined) == 1 and old not in rejoined, f"{rejoined}:\n{cluster.logs()}"
    listed = {r.replica_id: r.state for r in stats.replicas}
    assert listed[old] == DEAD and listed[rejoined[0]] == ACTIVE


def test_a_scheduler_restart_fails_what_was_in_flight_and_the_stack_recovers(
    cluster: Cluster, stub: api_pb2_grpc.GenerationStub, expected: dict[str, list[Expected]]
) -> None:
    """docs/gateway.md ("Failover, as a client sees it") promises this behaviour."""
    cluster.ensure_workers(2)
    url = cluster.gateway.base_url
    long = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    outcome: dict[str, object] = {}

    def whole() -> None:
        outcome["whole"] = httpx.post(f"{url}/v1/completions", json=long, timeout=60)

    events: list[str] = []

    def streamed() -> None:
        with httpx.stream(
            "POST", f"{url}/v1/completions", json={**long, "stream": True}, timeout=60
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(line[6:])

    threads = [threading.Thread(target=whole), threading.Thread(target=streamed)]
    for thread in threads:
        thread.start()
    grpc_stream = Stream(Expected([5, 6, 7, 8], [0] * 400, "")).start(stub)

    def all_under_way() -> bool:
        return (
            bool(events)
            and bool(grpc_stream.tokens)
            and (cluster.scheduler.stats().num_running >= 3)
        )

    wait_until(all_under_way, 20, "3 requests under way", cluster)
    cluster.scheduler.kill()
    for thread in threads:
        thread.join(30)
    finish_all([grpc_stream], 30)
    answer = outcome["whole"]
    assert isinstance(answer, httpx.Response) and answer.status_code == 503
    assert answer.json()["error"]["code"] == "service_unavailable"
    assert answer.headers["retry-after"]
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == "service_unavailable"
    assert grpc_stream.error is not None
    assert grpc_stream.error.code() == grpc.StatusCode.UNAVAILABLE

    cluster.scheduler = cluster.start_scheduler()  # same ports
    back = lambda: len(active(cluster.scheduler.stats())) == 2  # noqa: E731
    wait_until(back, 30, "workers back", cluster)
    ready = lambda: httpx.get(f"{url}/ready").status_code == 200  # noqa: E731
    wait_until(ready, 30, "gateway session", cluster)
    streams = start_streams(stub, expected["restarted"])
    finish_all(streams)
    assert_uninterrupted(cluster.model, streams)
    wait_until_idle(cluster.scheduler)
