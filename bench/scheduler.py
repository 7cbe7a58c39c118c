"""Cost of the scheduler core per step: schedule() + update() with many running decodes.

Every replica holds ``--seqs`` sequences in steady decode (prompts of 32 tokens,
block size 16, prefix caching on, so a block is granted and hashed every 16
steps). Each measured step is schedule(replica) then update(result), where the
result (one token for every running sequence) is built outside the timer, the
way a worker's reply arrives. The wire work of the service shell (serialize the
plan, parse the result) is timed separately. Figures are medians over the steps.

    python bench/scheduler.py                 # 256 and 1024 sequences x 1, 8, 32 replicas
    python bench/scheduler.py --seqs 256 --replicas 1 --steps 200
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

from pagoda.sampling_params import SamplingParams
from pagoda.v1 import session_pb2, step_pb2
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.scheduler import Scheduler

PROMPT_LEN = 32
BLOCK_SIZE = 16


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    model = fields.get("Model name", "unknown").strip()
    family = fields.get("CPU family", "?").strip()
    return f"{model} (family {family}, {fields.get('CPU(s)', '?').strip()} CPUs)"


def result_for(plan: step_pb2.StepPlan) -> step_pb2.StepResult:
    """What a worker returns: one token per sequence whose known tokens are all computed."""
    seqs = [
        n.seq
        for n in plan.new_sequences
        if n.num_cached_tokens + n.num_new_tokens == len(n.token_ids)
    ]
    seqs += list(plan.running_seqs)  # in steady state every running sequence decodes
    return step_pb2.StepResult(
        replica_id=plan.replica_id,
        epoch=plan.epoch,
        step=plan.step,
        seqs=seqs,
        token_ids=[(s * 7919) % 30_000 + 1 for s in seqs],
    )


def build(num_replicas: int, seqs_per_replica: int, steps: int) -> Scheduler:
    blocks_per_seq = -(-(PROMPT_LEN + steps + 64) // BLOCK_SIZE)
    cfg = SchedulerConfig(
        max_model_len=4096,
        block_size=BLOCK_SIZE,
        max_num_batched_tokens=max(8192, seqs_per_replica),
        max_num_seqs=seqs_per_replica,
        seed=0,
    )
    scheduler = Scheduler(cfg)
    for r in range(num_replicas):
        scheduler.join(r, max(seqs_per_replica * blocks_per_seq, 4096 // BLOCK_SIZE))
    params = SamplingParams(max_tokens=100_000, ignore_eos=True, temperature=0.0).to_proto()
    for i in range(num_replicas * seqs_per_replica):
        prompt = [(i * 31 + j) % 30_000 + 1 for j in range(PROMPT_LEN)]
        submit = session_pb2.Submit(request_id=f"req-{i}", prompt_token_ids=prompt, sampling=params)
        scheduler.add(submit, now=float(i))
    # Prefill everything, so that the measured steps are pure decodes.
    while scheduler.num_waiting or any(
        s.num_output_tokens == 0
        for r in scheduler.replica_ids
        for s in scheduler.replica(r).running
    ):
        for r in scheduler.replica_ids:
            plan = scheduler.schedule(r, 0.0)
            if plan is not None:
                scheduler.update(result_for(plan))
    return scheduler


def measure(num_replicas: int, seqs_per_replica: int, steps: int) -> dict[str, float]:
    scheduler = build(num_replicas, seqs_per_replica, steps)
    sched_us, update_us, wire_us, round_us = [], [], [], []
    plan = scheduler.schedule(0, 0.0)  # the first plan after prefill also drops nothing
    scheduler.update(result_for(plan))
    for _ in range(steps):
        round_total = 0.0
        for r in scheduler.replica_ids:
            t0 = time.perf_counter()
            plan = scheduler.schedule(r, 0.0)
            t1 = time.perf_counter()
            result = result_for(plan)
            t2 = time.perf_counter()
            wire = plan.SerializeToString()
            parsed = step_pb2.StepResult.FromString(result.SerializeToString())
            t3 = time.perf_counter()
            scheduler.update(parsed)
            t4 = time.perf_counter()
            assert len(plan.running_seqs) == seqs_per_replica and wire
            sched_us.append((t1 - t0) * 1e6)
            update_us.append((t4 - t3) * 1e6)
            wire_us.append((t3 - t2) * 1e6)
            round_total += (t1 - t0) + (t4 - t3)
        round_us.append(round_total * 1e6)
    return {
        "schedule": statistics.median(sched_us),
        "update": statistics.median(update_us),
        "step": statistics.median(s + u for s, u in zip(sched_us, update_us, strict=True)),
        "wire": statistics.median(wire_us),
        "round": statistics.median(round_us),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=64, help="measured steps per replica")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; Python {platform.python_version()}")
    print(
        "| running decodes / replica | replicas | schedule µs | update µs | "
        "schedule+update µs / step | µs / decode | all replicas once, ms | wire µs |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for seqs in args.seqs:
        for replicas in args.replicas:
            m = measure(replicas, seqs, args.steps)
            print(
                f"| {seqs} | {replicas} | {m['schedule']:.0f} | {m['update']:.0f} | "
                f"{m['step']:.0f} | {m['step'] / seqs:.2f} | {m['round'] / 1e3:.1f} | "
                f"{m['wire']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
