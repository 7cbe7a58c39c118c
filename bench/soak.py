"""Soak: minutes of mixed load on a stack whose workers are killed, drained and added.

It starts a stack of its own (``pagoda scheduler``, ``--workers`` workers and ``pagoda
gateway``, each a process, on free loopback ports) on the tiny random Llama of the tests
(or ``--model slow``, a larger one), in fp32, and sends requests as a Poisson process
at ``--rate`` per second for ``--duration`` seconds: gRPC ``Generate`` streams, gRPC
``Complete`` calls and REST SSE streams, each greedy with ``ignore_eos`` on one of
``--prompts`` random prompts, whose whole answers the offline ``pagoda.LLM`` computed
up front. A ``--hangup`` fraction of the streams is abandoned by its client part-way.
Meanwhile, every ``--chaos-every`` seconds on average, a worker is killed (-9), drained
(SIGTERM) or added, keeping between one and ``--workers`` + 1 of them.

Every answer is then checked: a gRPC answer must be the offline tokens exactly (or
differ first at a near-tie, the rule of tests/worker_svc/hf_oracle.py), a REST answer
the offline text and token count. It prints one JSON line:

- ``sent``, ``completed``, ``hung_up`` (deliberate), ``rejected`` (429, a full queue),
  ``lost`` (any other failure or unfinished answer: must be 0), ``errors`` by kind;
- ``tokens_duplicated`` (tokens a stream delivered twice: must be 0), ``mismatched``
  (answers that differ beyond a near-tie: must be 0), ``near_ties``;
- ``blocks_leaked``: KV blocks still held on live replicas once all is over (must be 0,
  from the scheduler's Stats);
- ``failover_pause_ms``: over the streams in flight when a worker was killed or
  drained, each one's longest wait between streamed chunks (p50, p99, max) — the pause a
  client sees while its sequence moves to another replica; ``itl_ms`` over all chunks;
- the disturbances (``kills``, ``drains``, ``joins``) and the settings.

The exit status is 1 when anything was lost, duplicated, mismatched or leaked.

    .venv/bin/python bench/soak.py --duration 120 --rate 6 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import math
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import httpx  # noqa: E402
from _machine import cpu_model  # noqa: E402  (beside this file)

from pagoda.v1 import api_pb2, api_pb2_grpc, common_pb2, session_pb2  # noqa: E402
from tests.e2e.stack import Gateway, Scheduler, Worker, slow_model, tiny_model  # noqa: E402

ACTIVE = session_pb2.ReplicaStats.ACTIVE


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the offline reference -----------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """One prompt and the offline engine's uninterrupted greedy answer to it."""

    prompt: list[int]
    token_ids: list[int]
    text: str


def references(model: Path, args: argparse.Namespace, rng: random.Random) -> list[Expected]:
    """The prompt pool and its answers, from the offline engine in one batch (fp32)."""
    import torch

    from pagoda import LLM, SamplingParams

    low, high = args.output_len
    prompts = [
        [rng.randrange(3, 384) for _ in range(rng.randrange(6, 40))] for _ in range(args.prompts)
    ]
    params = [
        SamplingParams(temperature=0.0, max_tokens=rng.randint(low, high), ignore_eos=True)
        for _ in prompts
    ]
    llm = LLM(model, dtype="float32", max_model_len=args.max_model_len, show_progress=False,
              kv_cache_memory=256 * 2**20)  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs faster on one thread than on two
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        torch.set_num_threads(threads)
    return [
        Expected(p, list(o.outputs[0].token_ids), o.outputs[0].text)
        for p, o in zip(prompts, outputs, strict=True)
    ]


# -- the stack and its disturbances --------------------------------------------------------


class Stack:
    """The scheduler, the gateway and the workers, with what was done to the workers."""

    def __init__(self, model: Path, args: argparse.Namespace) -> None:
        self.model = model
        self.args = args
        flags = ["--max-model-len", str(args.max_model_len), "--seed", "0",
                 "--heartbeat-interval-ms", "300",
                 "--heartbeat-timeout-ms", str(args.heartbeat_timeout_ms)]  # fmt: skip
        self.scheduler = Scheduler(model, extra=flags)
        self.gateway = Gateway(model, self.scheduler.grpc_addr)
        self.workers: dict[str, Worker] = {}
        self.state: dict[str, str] = {}  # starting, live, draining, gone
        self.events: list[tuple[float, str, str]] = []
        self._count = 0
        self._lock = threading.Lock()

    def start_worker(self) -> str:
        """Start a worker and wait for its registration (blocking: run it on a thread)."""
        with self._lock:
            self._count += 1
            name = f"soak-w{self._count}"
            self.state[name] = "starting"
        flags = ["--kv-cache-memory", "128MiB", "--threads", "1"]
        worker = Worker(self.model, self.scheduler.step_addr, name, flags)
        with self._lock:
            self.workers[name] = worker
            self.state[name] = "live"
        self.events.append((time.monotonic(), "join", name))
        return name

    def live(self) -> list[str]:
        with self._lock:
            return [n for n, s in self.state.items() if s == "live"]

    def starting(self) -> int:
        with self._lock:
            return sum(s == "starting" for s in self.state.values())

    def kill(self, name: str) -> None:
        self.events.append((time.monotonic(), "kill", name))
        with self._lock:
            self.state[name] = "gone"
        self.workers[name].kill()

    def drain(self, name: str) -> None:
        """SIGTERM: the worker hands its work back (or finishes it) and exits by itself."""
        self.events.append((time.monotonic(), "drain", name))
        with self._lock:
            self.state[name] = "draining"
        worker = self.workers[name]
        worker.proc.send_signal(signal.SIGTERM)

        def reap() -> None:
            worker.proc.wait()
            with self._lock:
                self.state[name] = "gone"

        threading.Thread(target=reap, daemon=True).start()

    def count(self, kind: str) -> int:
        return sum(1 for _, k, _ in self.events if k == kind)

    def close(self) -> None:
        for process in (self.gateway, *self.workers.values(), self.scheduler):
            process.kill()

    def write_logs(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for process in (self.scheduler, self.gateway, *self.workers.values()):
            (folder / f"{process.name}.log").write_text("".join(process.lines))


async def chaos(stack: Stack, args: argparse.Namespace, rng: random.Random, until: float) -> None:
    """Kill, drain and add workers at random moments, keeping one to ``workers`` + 1."""
    starts: set[asyncio.Task[str]] = set()
    while time.monotonic() < until:
        await asyncio.sleep(min(rng.expovariate(1 / args.chaos_every), until - time.monotonic()))
        if time.monotonic() >= until:
            break
        live, starting = stack.live(), stack.starting()
        actions = []
        if len(live) + starting < args.workers:
            actions = ["join"]
        else:
            if len(live) >= 2:
                actions += ["kill", "kill", "drain"]
            if len(live) + starting < args.workers + 1:
                actions.append("join")
        if not actions:
            continue
        action = rng.choice(actions)
        if action == "join":
            log("join: starting a worker")
            task = asyncio.create_task(asyncio.to_thread(stack.start_worker))
            starts.add(task)
            task.add_done_callback(starts.discard)
        else:
            victim = rng.choice(live)
            log(f"{action}: {victim}")
            (stack.kill if action == "kill" else stack.drain)(victim)
    await asyncio.gather(*starts, return_exceptions=True)


# -- the clients ---------------------------------------------------------------------------


@dataclass
class Result:
    """One request as its client saw it."""

    kind: str  # grpc-stream, grpc-unary, rest-stream
    want: Expected
    start: float
    end: float = 0.0
    arrivals: list[float] = field(default_factory=list)
    chunks: list[list[int]] = field(default_factory=list)  # token ids per chunk (gRPC)
    text: str = ""
    completion_tokens: int = 0
    finished: bool = False
    hung_up: bool = False
    rejected: bool = False
    error: str = ""

    @property
    def tokens(self) -> list[int]:
        return [t for chunk in self.chunks for t in chunk]

    @property
    def longest_pause(self) -> float:
        times = [self.start, *self.arrivals]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def _request(want: Expected) -> api_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(
        temperature=0.0, max_tokens=len(want.token_ids), ignore_eos=True
    )
    return api_pb2.GenerateRequest(
        token_ids=api_pb2.TokenIds(ids=want.prompt), sampling=sampling, return_token_ids=True
    )


async def grpc_stream(stub: api_pb2_grpc.GenerationStub, result: Result, hangup: int) -> None:
    call = stub.Generate(_request(result.want))
    try:
        async for response in call:
            now = time.monotonic()
            for choice in response.choices:
                result.chunks.append(list(choice.token_ids))
                result.arrivals.append(now)
                result.finished |= choice.finish_reason == common_pb2.FINISH_REASON_LENGTH
            if hangup and len(result.chunks) >= hangup:
                result.hung_up = True
                call.cancel()
                return
    except grpc.aio.AioRpcError as exc:
        _grpc_error(result, exc)


async def grpc_unary(stub: api_pb2_grpc.GenerationStub, result: Result) -> None:
    try:
        answer = await stub.Complete(_request(result.want))
    except grpc.aio.AioRpcError as exc:
        _grpc_error(result, exc)
        return
    choice = answer.choices[0]
    result.chunks.append(list(choice.token_ids))
    result.finished = choice.finish_reason == common_pb2.FINISH_REASON_LENGTH


def _grpc_error(result: Result, exc: grpc.aio.AioRpcError) -> None:
    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        result.rejected = True
    result.error = f"grpc {exc.code().name}: {exc.details()}"


async def rest_stream(client: httpx.AsyncClient, result: Result, hangup: int) -> None:
    body = {"prompt": result.want.prompt, "max_tokens": len(result.want.token_ids),
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.rejected = response.status_code == 429
                result.error = f"http {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = f"stream error: {event['error']}"
                    return
                for choice in event.get("choices") or ():
                    result.text += choice.get("text") or ""
                    result.arrivals.append(time.monotonic())
                    result.finished |= choice.get("finish_reason") == "length"
                if event.get("usage"):
                    result.completion_tokens = event["usage"]["completion_tokens"]
                if hangup and len(result.arrivals) >= hangup:
                    result.hung_up = True
                    return
    except httpx.HTTPError as exc:
        result.error = f"http {type(exc).__name__}: {exc}"


async def load(
    stack: Stack, wants: list[Expected], args: argparse.Namespace, rng: random.Random,
    until: float,
) -> list[Result]:  # fmt: skip
    """Poisson arrivals until ``until``; returns once every request has ended."""
    results: list[Result] = []
    tasks: list[asyncio.Task[None]] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with (
        grpc.aio.insecure_channel(stack.gateway.grpc_addr) as channel,
        httpx.AsyncClient(base_url=stack.gateway.base_url, timeout=300, limits=limits) as http,
    ):
        stub = api_pb2_grpc.GenerationStub(channel)
        while time.monotonic() < until:
            want = rng.choice(wants)
            draw = rng.random()
            hangup = rng.randint(1, 8) if rng.random() < args.hangup else 0
            kind = "grpc-stream" if draw < 0.7 else "rest-stream" if draw < 0.9 else "grpc-unary"
            result = Result(kind, want, time.monotonic())
            results.append(result)
            if kind == "grpc-stream":
                work = grpc_stream(stub, result, hangup)
            elif kind == "rest-stream":
                work = rest_stream(http, result, hangup)
            else:
                work = grpc_unary(stub, result)
            task = asyncio.create_task(work)
            task.add_done_callback(lambda _, r=result: setattr(r, "end", time.monotonic()))
            tasks.append(task)
            await asyncio.sleep(rng.expovariate(args.rate))
        log(f"load over: waiting for {sum(not t.done() for t in tasks)} requests in flight")
        await asyncio.wait(tasks, timeout=args.settle)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return results


# -- checking ------------------------------------------------------------------------------


@dataclass
class Verdict:
    completed: int = 0
    lost: int = 0
    duplicated: int = 0
    mismatched: int = 0
    near_ties: int = 0
    errors: dict[str, int] = field(default_factory=dict)


def duplicated_tokens(result: Result) -> int:
    """Tokens a stream delivered twice: an excess over the expected length, or a chunk
    that repeats the one before it where the answer should go on."""
    want, got = result.want.token_ids, result.tokens
    extra = max(0, len(got) - len(want))
    position = 0
    for previous, chunk in itertools.pairwise(result.chunks):
        position += len(previous)
        if (
            chunk
            and chunk == previous
            and got[position : position + len(chunk)] != want[position : position + len(chunk)]
        ):
            extra += len(chunk)
    return extra


def check(results: list[Result], model: Path) -> Verdict:
    verdict = Verdict()
    for result in results:
        if result.hung_up or result.rejected:
            continue
        if result.error or not result.finished:
            verdict.lost += 1
            key = (result.error or "unfinished").split(":")[0]
            verdict.errors[key] = verdict.errors.get(key, 0) + 1
            log(f"lost a {result.kind}: {result.error or 'unfinished'}")
            continue
        verdict.completed += 1
        want = result.want
        if result.kind == "rest-stream":
            if result.text != want.text or result.completion_tokens != len(want.token_ids):
                verdict.mismatched += 1
                log(f"a REST answer differs ({result.completion_tokens} tokens)")
            continue
        duplicated = duplicated_tokens(result)
        verdict.duplicated += duplicated
        got = result.tokens
        if got == want.token_ids:
            continue
        if duplicated or len(got) != len(want.token_ids):
            verdict.mismatched += 1
            continue
        from tests.worker_svc.hf_oracle import assert_matches_reference, hf_greedy

        [ref] = hf_greedy(model, [want.prompt], len(want.token_ids))
        try:
            assert_matches_reference(got, ref)
            verdict.near_ties += 1
        except AssertionError as exc:
            verdict.mismatched += 1
            log(f"a {result.kind} answer differs: {exc}")
    return verdict


def blocks_leaked(stack: Stack, within: float = 30.0) -> tuple[int, session_pb2.StatsResponse]:
    """KV blocks held on live replicas once nothing runs or waits (0 when none leaked)."""
    deadline = time.monotonic() + within
    while True:
        stats = stack.scheduler.stats()
        live = [r for r in stats.replicas if r.state == ACTIVE]
        held = sum(r.num_blocks - r.num_free_blocks for r in live)
        idle = not stats.num_running and not stats.num_waiting
        if (idle and not held) or time.monotonic() > deadline:
            return held, stats
        time.sleep(0.2)


def quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return {
        "n": len(values),
        "p50": round(statistics.median(ordered) * 1000, 1),
        "p99": round(p99 * 1000, 1),
        "max": round(ordered[-1] * 1000, 1),
    }


def pauses(results: list[Result], events: list[tuple[float, str, str]]) -> dict[str, float]:
    """Each stream's longest wait between chunks, over streams in flight at a kill or drain."""
    moments = [t for t, kind, _ in events if kind in ("kill", "drain")]
    hit = [
        r.longest_pause
        for r in results
        if r.kind != "grpc-unary" and r.arrivals and not r.hung_up
        and any(r.start <= t <= (r.end or r.arrivals[-1]) for t in moments)
    ]  # fmt: skip
    return quantiles(hit)


def inter_chunk(results: list[Result]) -> dict[str, float]:
    gaps = [
        b - a for r in results for a, b in itertools.pairwise(r.arrivals) if r.kind != "grpc-unary"
    ]
    return quantiles(gaps)


# -- main ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--rate", type=float, default=6.0, help="requests per second")
    parser.add_argument("--workers", type=int, default=2, help="workers kept (one more at most)")
    parser.add_argument("--model", choices=["tiny", "slow"], default="tiny")
    parser.add_argument(
        "--chaos-every", type=float, default=8.0, help="mean seconds between disturbances"
    )
    parser.add_argument(
        "--hangup", type=float, default=0.05, help="fraction of requests abandoned part-way"
    )
    parser.add_argument(
        "--output-len", type=int, nargs=2, default=(32, 400), metavar=("MIN", "MAX"),
        help="tokens each prompt's answer has",
    )  # fmt: skip
    parser.add_argument("--prompts", type=int, default=48, help="distinct prompts")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--heartbeat-timeout-ms", type=int, default=1500)
    parser.add_argument(
        "--settle", type=float, default=120.0, help="seconds requests get to end after the load"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models-dir", type=Path, default=None, help="where to build the model")
    parser.add_argument("--log-dir", type=Path, default=None, help="write every process's log")
    args = parser.parse_args()
    if args.workers < 1 or args.rate <= 0 or args.duration <= 0:
        parser.error("--workers, --rate and --duration must be positive")
    return args


def main() -> int:
    args = parse_args()
    rng = random.Random(args.seed)
    root = args.models_dir or Path(tempfile.mkdtemp(prefix="pagoda-soak-"))
    model = (tiny_model if args.model == "tiny" else slow_model)(root)
    log(f"offline references for {args.prompts} prompts")
    wants = references(model, args, rng)
    stack = Stack(model, args)
    try:
        for _ in range(args.workers):
            stack.start_worker()
        log(f"stack up: {args.workers} workers; {args.duration:g}s of load at {args.rate:g}/s")
        began = time.monotonic()
        until = began + args.duration

        async def run() -> list[Result]:
            disturb = asyncio.create_task(chaos(stack, args, rng, until))
            results = await load(stack, wants, args, rng, until)
            await disturb
            return results

        results = asyncio.run(run())
        wall = time.monotonic() - began
        leaked, stats = blocks_leaked(stack)
        verdict = check(results, model)
    finally:
        if args.log_dir is not None:
            stack.write_logs(args.log_dir)
        stack.close()
    report = summary(args, results, verdict, stack, leaked, stats, wall)
    print(json.dumps(report))
    bad = verdict.lost or verdict.duplicated or verdict.mismatched or leaked
    return 1 if bad else 0


def summary(
    args: argparse.Namespace, results: list[Result], verdict: Verdict, stack: Stack,
    leaked: int, stats: session_pb2.StatsResponse, wall: float,
) -> dict[str, Any]:  # fmt: skip
    generated = sum(
        len(r.tokens) if r.kind != "rest-stream" else r.completion_tokens for r in results
    )
    return {
        "bench": "soak",
        "model": args.model,
        "duration_s": args.duration,
        "wall_s": round(wall, 1),
        "rate": args.rate,
        "workers": args.workers,
        "chaos_every_s": args.chaos_every,
        "sent": len(results),
        "completed": verdict.completed,
        "hung_up": sum(r.hung_up for r in results),
        "rejected": sum(r.rejected for r in results),
        "lost": verdict.lost,
        "errors": verdict.errors,
        "tokens_duplicated": verdict.duplicated,
        "mismatched": verdict.mismatched,
        "near_ties": verdict.near_ties,
        "blocks_leaked": leaked,
        "waiting_at_end": stats.num_waiting,
        "running_at_end": stats.num_running,
        "kills": stack.count("kill"),
        "drains": stack.count("drain"),
        "joins": stack.count("join") - args.workers,
        "replicas_seen": len(stats.replicas),
        "output_tokens": generated,
        "failover_pause_ms": pauses(results, stack.events),
        "itl_ms": inter_chunk(results),
        "cpu": cpu_model(),
        "date": datetime.date.today().isoformat(),
    }


if __name__ == "__main__":
    sys.exit(main())
