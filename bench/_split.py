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

from pagoda.announcements import SCHEDULER_LISTENING

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
    cpu: dict[str, float] = {}

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
        watch = len(prompts) > 1  # the batch, not the single-prompt latency runs
        if watch:
            before = {r: cpu_seconds(p) for r, p in pids.items()}
            steps = replica_steps(stack.found["scheduler"])
        out = loop.run_until_complete(batch(prompts, max_tokens))
        if watch:
            done = replica_steps(stack.found["scheduler"]) - steps
            for role, pid in pids.items():
                cpu[role] = (cpu_seconds(pid) - before[role]) / max(done, 1)
            cpu["steps"] = done
        return out

    try:
        timings = measure(generate, spec["runs"], spec["output_len"])
        return {
            **timings,
            "outside_worker_cpu_ms_per_step": {
                "scheduler": round(cpu.get("scheduler", 0) * 1e3, 3),
                "gateway": round(cpu.get("gateway", 0) * 1e3, 3),
                "steps_measured": cpu.get("steps", 0),
            },
        }
    finally:
        loop.run_until_complete(channel.close())
        loop.close()
        stack.stop()
