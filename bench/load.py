"""Memory under repeated load: each service's RSS after waves of concurrent streams.

It starts a stack of its own (``pagoda scheduler``, one ``pagoda worker`` and ``pagoda
gateway``, each a process on free loopback ports) with ``pagoda serve``'s defaults: the
default model (SmolLM2-135M-Instruct, its GGUF) in float32, a 1 GiB KV cache on the
CPU, 256 sequences at once (``--model tiny``: the tests' tiny random Llama instead). Then
it sends ``--waves`` waves of ``--streams`` streams at once: REST SSE ``/v1/completions``
streams and (a ``--grpc`` fraction) gRPC ``Generate`` streams, each of random words
answered by ``--max-tokens MIN MAX`` tokens (``ignore_eos``), of which a ``--hangup``
fraction is abandoned by its client after a random number of chunks.

After each wave it waits until the stack is idle (every client done, the scheduler's
Stats with nothing running or waiting and every KV block free) and reads each process's
``VmRSS`` and ``VmHWM`` (its peak) from /proc. It prints one JSON line per wave and a
summary line: RSS after the first and the last wave per service, the ratios
last/first and last/one-before-last (the targets are 1.10 and 1.02), and whether
they were met. The exit status is 1 when a stream was lost (neither finished, rejected
nor hung up on purpose) or a target was missed.

    .venv/bin/python bench/load.py                                # 5 waves x 1,000 streams
    .venv/bin/python bench/load.py --waves 2 --streams 100        # a quick look
    .venv/bin/python bench/load.py --model tiny --grpc 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import httpx  # noqa: E402
from _machine import cpu_model  # noqa: E402  (beside this file)

from pagoda.v1 import api_pb2, api_pb2_grpc, common_pb2  # noqa: E402
from tests.e2e.stack import Gateway, Process, Scheduler, Worker, tiny_model  # noqa: E402

GROWTH_OVERALL = 1.10  # last wave over the first
GROWTH_LAST = 1.02  # last wave over the one before
# Prompts are random words from this text, so the gateway tokenizes real text.
TEXT = (
    "the of and to in is was that for on with as by at from his her they which this be "
    "river mountain city garden window letter market winter summer morning evening story "
    "music paper stone water light forest ocean bridge train school friend family "
    "quickly slowly always never often because although while before after under over"
)
WORDS = TEXT.split()


def log(message: str) -> None:
    print(f"[load {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the stack -----------------------------------------------------------------------------


class Stack:
    """The scheduler, one worker and the gateway, each a process of its own."""

    def __init__(self, args: argparse.Namespace) -> None:
        weights, card = model_paths(args)
        self.model_id = ""
        sched = ["--max-num-seqs", str(args.max_num_seqs), "--seed", "0"]
        if args.max_model_len:
            sched += ["--max-model-len", str(args.max_model_len)]
        env = {"PAGODA_LOCAL_WORKERS": "1"}
        self.scheduler = Scheduler(card, extra=sched, env=env)
        worker = ["--dtype", args.dtype, "--kv-cache-memory", args.kv_cache_memory]
        if args.max_model_len:
            worker += ["--max-model-len", str(args.max_model_len)]
        self.worker = Worker(weights, self.scheduler.step_addr, "load-w1", worker, env=env)
        self.gateway = Gateway(card, self.scheduler.grpc_addr, env=env)
        self.worker_http = self.worker.wait_for(r"worker load-w1 http=(\S+)").group(1)

    @property
    def processes(self) -> dict[str, Process]:
        return {"gateway": self.gateway, "scheduler": self.scheduler, "worker": self.worker}

    def idle(self, within: float) -> dict[str, Any]:
        """Wait until nothing runs or waits and every KV block is free; what Stats said."""
        deadline = time.monotonic() + within
        while True:
            stats = self.scheduler.stats()
            held = sum(r.num_blocks - r.num_free_blocks for r in stats.replicas)
            idle = not stats.num_running and not stats.num_waiting and not held
            if idle or time.monotonic() > deadline:
                return {"running": stats.num_running, "waiting": stats.num_waiting,
                        "blocks_held": held}  # fmt: skip
            time.sleep(0.2)

    def in_flight(self) -> dict[str, float]:
        """What the gateway and the worker still hold once idle: both must be 0."""
        gateway = gauge(f"{self.gateway.base_url}/metrics", "vllm:num_requests_running")
        worker = gauge(f"http://{self.worker_http}/metrics", "pagoda_worker_running_sequences")
        return {"gateway_requests": gateway, "worker_sequences": worker}

    def close(self) -> None:
        for process in self.processes.values():
            process.kill()

    def write_logs(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, process in self.processes.items():
            (folder / f"{name}.log").write_text("".join(process.lines))


def gauge(url: str, name: str) -> float:
    """The value of one gauge (summed over its labels) from a Prometheus text page."""
    total = 0.0
    for line in httpx.get(url, timeout=10, trust_env=False).text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


def model_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """(weights, card): what the worker loads and the folder the others read."""
    if args.model == "tiny":
        path = tiny_model(Path(tempfile.mkdtemp(prefix="pagoda-load-")))
        return path, path
    from pagoda.default_model import default_model_path
    from pagoda.model_card.writer import ensure_model_card

    weights = default_model_path() if args.model == "default" else Path(args.model)
    return weights, ensure_model_card(weights).path


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process and its descendants, in MiB."""
    total = {"rss_mb": 0, "hwm_mb": 0}
    for each in [pid, *descendants(pid)]:
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                total["rss_mb" if key == "VmRSS" else "hwm_mb"] += int(value.split()[0]) // 1024
    return total


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


# -- the clients ---------------------------------------------------------------------------


@dataclass
class Stream:
    """One stream as its client saw it."""

    kind: str  # rest or grpc
    max_tokens: int
    hangup: int  # chunks after which the client goes away (0: never)
    chunks: int = 0
    finished: bool = False
    hung_up: bool = False
    rejected: bool = False
    error: str = ""


def prompt(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


async def rest_stream(client: httpx.AsyncClient, model: str, text: str, s: Stream) -> None:
    body = {"model": model, "prompt": text, "max_tokens": s.max_tokens, "temperature": 0.8,
            "ignore_eos": True, "stream": True}  # fmt: skip
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                s.rejected = response.status_code == 429
                s.error = f"http {response.status_code}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    s.error = "stream error"
                    return
                for choice in event.get("choices") or ():
                    s.chunks += 1
                    s.finished |= choice.get("finish_reason") == "length"
                if s.hangup and s.chunks >= s.hangup and not s.finished:
                    s.hung_up = True
                    return  # leaving the block closes the connection
    except httpx.HTTPError as exc:
        s.error = f"http {type(exc).__name__}"


async def grpc_stream(stub: api_pb2_grpc.GenerationStub, text: str, s: Stream) -> None:
    sampling = common_pb2.SamplingParams(temperature=0.8, max_tokens=s.max_tokens, ignore_eos=True)
    call = stub.Generate(api_pb2.GenerateRequest(text=text, sampling=sampling))
    try:
        async for response in call:
            for choice in response.choices:
                s.chunks += 1
                s.finished |= choice.finish_reason == common_pb2.FINISH_REASON_LENGTH
            if s.hangup and s.chunks >= s.hangup and not s.finished:
                s.hung_up = True
                call.cancel()
                return
    except grpc.aio.AioRpcError as exc:
        s.rejected = exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        s.error = f"grpc {exc.code().name}"


async def wave(stack: Stack, args: argparse.Namespace, rng: random.Random) -> list[Stream]:
    """``--streams`` streams started at once; returns when every one has ended."""
    low, high = args.max_tokens
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.stream_timeout, connect=60)
    async with (
        grpc.aio.insecure_channel(stack.gateway.grpc_addr) as channel,
        httpx.AsyncClient(base_url=stack.gateway.base_url, limits=limits, timeout=timeout,
                          trust_env=False) as http,
    ):  # fmt: skip
        stub = api_pb2_grpc.GenerationStub(channel)
        streams, work = [], []
        for _ in range(args.streams):
            max_tokens = rng.randint(low, high)
            hangup = rng.randint(1, max(1, max_tokens - 1)) if rng.random() < args.hangup else 0
            kind = "grpc" if rng.random() < args.grpc else "rest"
            s = Stream(kind, max_tokens, hangup)
            text = prompt(rng, *args.prompt_words)
            streams.append(s)
            if kind == "grpc":
                work.append(grpc_stream(stub, text, s))
            else:
                work.append(rest_stream(http, stack.model_id, text, s))
        await asyncio.gather(*work)
    return streams


# -- main ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--waves", type=int, default=5)
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams per wave")
    parser.add_argument(
        "--model", default="default", help="default, tiny, or a model path (HF folder or GGUF)"
    )
    parser.add_argument(
        "--dtype", default="float32",
        help="the worker's dtype (auto: the default model's bfloat16, slow without AVX-512 BF16)",
    )  # fmt: skip
    parser.add_argument("--kv-cache-memory", default="1GiB", help="the worker's KV cache")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    parser.add_argument(
        "--max-tokens", type=int, nargs=2, default=(2, 8), metavar=("MIN", "MAX"),
        help="tokens each answer has",
    )  # fmt: skip
    parser.add_argument(
        "--prompt-words", type=int, nargs=2, default=(4, 16), metavar=("MIN", "MAX"),
        help="random words per prompt",
    )  # fmt: skip
    parser.add_argument("--hangup", type=float, default=0.2, help="fraction hung up part-way")
    parser.add_argument("--grpc", type=float, default=0.0, help="fraction sent as gRPC streams")
    parser.add_argument("--stream-timeout", type=float, default=1800.0, help="seconds per read")
    parser.add_argument("--idle-timeout", type=float, default=120.0, help="seconds to go idle")
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds between idle and reading RSS"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", type=Path, default=None, help="write every process's log")
    args = parser.parse_args()
    if args.waves < 1 or args.streams < 1:
        parser.error("--waves and --streams must be positive")
    return args


def main() -> int:
    args = parse_args()
    # SIGTERM ends the run as an exception would, so the stack's processes are killed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    rng = random.Random(args.seed)
    log(f"starting the stack ({args.model})")
    stack = Stack(args)
    rows: list[dict[str, Any]] = []
    lost = 0
    try:
        stack.model_id = httpx.get(f"{stack.gateway.base_url}/v1/models", trust_env=False).json()[
            "data"
        ][0]["id"]
        rows.append({"wave": 0, **{k: memory(p.proc.pid) for k, p in stack.processes.items()}})
        print(json.dumps(rows[-1]), flush=True)
        for number in range(1, args.waves + 1):
            log(f"wave {number}: {args.streams} streams")
            began = time.monotonic()
            streams = asyncio.run(wave(stack, args, rng))
            wall = time.monotonic() - began
            state = stack.idle(args.idle_timeout)
            time.sleep(args.settle)
            state.update(stack.in_flight())
            row = wave_row(number, streams, wall, state, stack)
            lost += row["lost"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if args.log_dir is not None:
            stack.write_logs(args.log_dir)
        stack.close()
    report = summary(args, rows, lost)
    print(json.dumps(report), flush=True)
    return 0 if report["met"] and not lost else 1


def wave_row(
    number: int, streams: list[Stream], wall: float, state: dict[str, Any], stack: Stack
) -> dict[str, Any]:
    finished = sum(s.finished for s in streams)
    hung_up = sum(s.hung_up for s in streams)
    rejected = sum(s.rejected for s in streams)
    errors: dict[str, int] = {}
    for s in streams:
        if not (s.finished or s.hung_up or s.rejected):
            key = s.error or "unfinished"
            errors[key] = errors.get(key, 0) + 1
    return {
        "wave": number,
        "wall_s": round(wall, 1),
        "finished": finished,
        "hung_up": hung_up,
        "rejected": rejected,
        "lost": sum(errors.values()),
        "errors": errors,
        **state,
        **{name: memory(p.proc.pid) for name, p in stack.processes.items()},
    }


def summary(args: argparse.Namespace, rows: list[dict[str, Any]], lost: int) -> dict[str, Any]:
    """RSS after the first and the last wave per service, and the growth between."""
    first, last = rows[1] if len(rows) > 1 else rows[0], rows[-1]
    before = rows[-2] if len(rows) > 2 else first
    services: dict[str, Any] = {}
    met = True
    for name in ("gateway", "scheduler", "worker"):
        a, b, c = first[name]["rss_mb"], before[name]["rss_mb"], last[name]["rss_mb"]
        overall, latest = c / max(1, a), c / max(1, b)
        ok = overall <= GROWTH_OVERALL and latest <= GROWTH_LAST
        met &= ok
        services[name] = {
            "rss_mb_per_wave": [r[name]["rss_mb"] for r in rows],
            "hwm_mb": last[name]["hwm_mb"],
            "last_over_first": round(overall, 3),
            "last_over_before": round(latest, 3),
            "met": ok,
        }
    return {
        "bench": "load",
        "model": args.model,
        "waves": args.waves,
        "streams": args.streams,
        "hangup": args.hangup,
        "grpc": args.grpc,
        "max_tokens": list(args.max_tokens),
        "kv_cache_memory": args.kv_cache_memory,
        "lost": lost,
        "services": services,
        "met": met,
        "cpu": cpu_model(),
        "date": datetime.date.today().isoformat(),
    }


if __name__ == "__main__":
    sys.exit(main())
