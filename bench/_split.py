"""The offline workload through the running services (``bench/offline.py --stack split``).

``pagoda serve`` runs the stack (scheduler, one worker, gateway) as its own
processes; this process is the client: token-id requests, not streamed, through
the public gRPC API (``Complete``, all of a batch at once). Besides the timings of
bench/offline.py it reports what the split costs on the CPU: the CPU time the
scheduler and the gateway processes spend per step while the batch runs, read
from /proc (on a 2-core machine every millisecond of it is taken from the model).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from pagoda.announcements import SCHEDULER_LISTENING, WORKER_REGISTERED

BANNER = re.compile(r"gRPC:\s+(\S+)")
SCHEDULER = SCHEDULER_LISTENING.pattern


class ServeStack:
    """``pagoda serve`` in the background, with its addresses and its children's pids."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagoda", "serve", *argv],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )  # fmt: skip
        self.found: dict[str, str] = {}
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(600) or "grpc" not in self.found:
            self.stop()
            raise RuntimeError("pagoda serve did not come up")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            sys.stderr.write(line)
            for key, pattern in (("grpc", BANNER), ("scheduler", SCHEDULER)):
                match = pattern.search(line)
                if match and key not in self.found:
                    self.found[key] = match.group(1)
            # The probe ports, whose /metrics time the steps.
            for key, announcement in (
                ("scheduler_http", SCHEDULER_LISTENING),
                ("worker_http", WORKER_REGISTERED),
            ):
                match = announcement.search(line)
                if match and key not in self.found:
                    self.found[key] = match["http"]
            if "grpc" in self.found:
                self._ready.set()
        self._ready.set()

    def child_pid(self, role: str) -> int:
        """The pid of the ``pagoda <role>`` child."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and role.encode() in cmd:
                return int(entry.name)
        raise LookupError(f"no {role} child of pagoda serve")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric_sums(address: str, names: tuple[str, ...]) -> dict[str, float]:
    """The unlabelled samples ``names`` of a service's /metrics (``address`` is host:port
    or a port), for differences before and after a run."""
    import urllib.request

    url = f"http://{address if ':' in address else '127.0.0.1:' + address}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            found[name] = float(value)
    return found


# The scheduler's step round trip (plan sent to result applied) and the worker's compute.
STEP_METRICS = (
    "pagoda_step_seconds_sum", "pagoda_step_seconds_count",
    "pagoda_worker_step_seconds_sum", "pagoda_worker_step_seconds_count",
)  # fmt: skip


def step_times(found: dict[str, str]) -> dict[str, float]:
    sums: dict[str, float] = {}
    for key in ("scheduler_http", "worker_http"):
        if key in found:
            sums |= metric_sums(found[key], STEP_METRICS)
    return sums


def replica_steps(scheduler_addr: str) -> int:
    import grpc

    from pagoda.v1 import session_pb2, session_pb2_grpc

    with grpc.insecure_channel(scheduler_addr) as channel:
        stats = session_pb2_grpc.SchedulerStub(channel).Stats(session_pb2.StatsRequest())
    return sum(r.steps for r in stats.replicas)


def split_engine(spec: dict, measure) -> dict[str, Any]:
    """Run bench/offline.py's measurement against the services; see the module docstring."""
    import grpc

    from pagoda.v1 import api_pb2, api_pb2_grpc, common_pb2

    stack = ServeStack([
        "--model", spec["model"], "--workers", "1", "--dtype", spec["dtype"],
        "--max-model-len", str(spec["max_model_len"]), "--max-num-seqs",
        str(spec["max_num_seqs"]), "--max-num-batched-tokens",
        str(spec["max_num_batched_tokens"]), "--kv-cache-memory",
        str(spec["kv_cache_bytes"]), "--port", "0", "--grpc-port", "0",
        "--seed", str(spec["seed"]),
    ])  # fmt: skip
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # the channel binds to the loop current when it is made
    channel = grpc.aio.insecure_channel(stack.found["grpc"])
    stub = api_pb2_grpc.GenerationStub(channel)
    seen: dict[str, dict[str, float]] = {}

    async def batch(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        sampling = common_pb2.SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
            detokenize=spec.get("detokenize", True),
        )  # fmt: skip
        calls = [
            stub.Complete(
                api_pb2.GenerateRequest(
                    token_ids=api_pb2.TokenIds(ids=p), sampling=sampling, return_token_ids=True
                )
            )
            for p in prompts
        ]
        responses = await asyncio.gather(*calls)
        return [list(r.choices[0].token_ids) for r in responses]

    pids = {role: stack.child_pid(role) for role in ("scheduler", "gateway")}

    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        # The batch, and the single request's decode (not its one-token TTFT run).
        name = "batch" if len(prompts) > 1 else "single" if max_tokens > 1 else None
        if name:
            before = {r: cpu_seconds(p) for r, p in pids.items()}
            steps = replica_steps(stack.found["scheduler"])
            times = step_times(stack.found)
        out = loop.run_until_complete(batch(prompts, max_tokens))
        if name:
            done = max(replica_steps(stack.found["scheduler"]) - steps, 1)
            took = {k: v - times.get(k, 0.0) for k, v in step_times(stack.found).items()}
            used = {r: cpu_seconds(p) - before[r] for r, p in pids.items()}
            seen[name] = {
                **{f"{role}_cpu_ms": s / done * 1e3 for role, s in used.items()},
                "round_trip_ms": _mean_ms(took, "pagoda_step_seconds"),
                "worker_compute_ms": _mean_ms(took, "pagoda_worker_step_seconds"),
                "steps": done,
            }
        return out

    try:
        timings = measure(generate, spec["runs"], spec["output_len"])
        return {
            **timings,
            # Of the last measured run of each kind: per step, the CPU the scheduler and
            # the gateway spent, the scheduler's round trip and the worker's compute.
            "outside_worker_cpu_ms_per_step": {
                "scheduler": round(seen.get("batch", {}).get("scheduler_cpu_ms", 0.0), 3),
                "gateway": round(seen.get("batch", {}).get("gateway_cpu_ms", 0.0), 3),
                "steps_measured": seen.get("batch", {}).get("steps", 0),
            },
            "per_step": {
                name: {k: round(v, 3) for k, v in figures.items()} for name, figures in seen.items()
            },
        }
    finally:
        loop.run_until_complete(channel.close())
        loop.close()
        stack.stop()


def _mean_ms(took: dict[str, float], metric: str) -> float:
    count = took.get(f"{metric}_count", 0.0)
    return took.get(f"{metric}_sum", 0.0) / count * 1e3 if count else 0.0
