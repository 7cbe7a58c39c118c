"""``pagoda worker``: flags, thread count, model loading, then the worker service.

The order matters: the torch thread count must be settled before torch is imported
(several workers on one machine divide its cores), so this module and
``worker_svc.service`` import torch only inside ``run``, after ``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS`` are set. The probe port opens before the weights load, so a
Kubernetes liveness probe is answered during a long load.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pagoda.default_model import default_model_path
from pagoda.flags import Flag, Unset, add_flags, given, host_and_pid
from pagoda.model_card.errors import ModelCardError
from pagoda.model_card.writer import identity_of
from pagoda.secrets import read_secret
from worker_svc.runtime import bind_threads, settle, threads_bind_spec
from worker_svc.service import Runner, WorkerService
from worker_svc.settings import ModelInfo, WorkerSettings

log = logging.getLogger("pagoda.worker")

DEFAULT_SCHEDULER = "127.0.0.1:50062"
DEFAULT_HTTP_PORT = 8002
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
    "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
    "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_bytes(text: str) -> int:
    """``"2GiB"`` -> 2147483648; decimal (``GB``) and binary (``GiB``) units, any case."""
    match = _SIZE.fullmatch(text)
    unit = match and _UNITS.get(match.group(2).lower())
    if not match or unit is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size in bytes (e.g. 1073741824, 2GiB, 512MiB, 1.5GB)"
        )
    return int(float(match.group(1)) * unit)


def cpu_cores() -> int:
    """Cores this process may use: its affinity mask (which a cpuset narrows), capped by
    its cgroup's CPU quota (a Kubernetes CPU limit), which the mask does not show: torch
    with one thread per node core under a 2-CPU limit is throttled most of each period."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return cores if quota is None else max(1, min(cores, int(quota)))


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs this process's cgroup may use per period (quota / period); None: no quota.

    cgroup v2: ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD") in the process's own cgroup
    (``/proc/self/cgroup``'s ``0::PATH``; inside a container with its own cgroup
    namespace that is the root). cgroup v1: ``cpu/cpu.cfs_quota_us`` (-1: none).
    """
    candidates = [root / "cpu.max"]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                candidates.insert(0, root / line[3:].lstrip("/") / "cpu.max")
    except OSError:
        pass
    for path in candidates:
        try:
            quota, period = path.read_text().split()[:2]
        except (OSError, ValueError):
            continue
        return None if quota == "max" else int(quota) / int(period)
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def default_threads() -> int:
    """``max(1, cores // PAGODA_LOCAL_WORKERS)``: local workers divide the machine."""
    try:
        local = max(1, int(os.environ.get("PAGODA_LOCAL_WORKERS", "1")))
    except ValueError:
        local = 1
    return max(1, cpu_cores() // local)


FLAGS = (
    Flag(
        "--scheduler",
        default=DEFAULT_SCHEDULER,
        env="PAGODA_STEP_ADDR",
        metavar="HOST:PORT",
        help="the scheduler's step address, which the worker dials",
    ),
    Flag(
        "--model",
        default=Unset("the default model, SmolLM2-135M-Instruct"),
        env="PAGODA_MODEL",
        help="a Hugging Face folder or a .gguf file",
    ),
    Flag(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and KV-cache dtype; auto: the checkpoint's (float16 runs as bfloat16 on "
        "a CPU, a GGUF file as bfloat16)",
    ),
    Flag("--device", default="auto", help="cpu, cuda, cuda:N or auto"),
    Flag("--block-size", type=int, default=16, help="tokens per KV block"),
    Flag(
        "--num-kv-blocks",
        type=int,
        default=Unset("as many as --kv-cache-memory holds"),
        help="KV-cache blocks to allocate",
    ),
    Flag(
        "--kv-cache-memory",
        type=parse_bytes,
        default=Unset("1GiB on a CPU; on a GPU, 90% of its memory less the weights"),
        metavar="BYTES",
        help="KV-cache budget, e.g. 2GiB or 512MiB",
    ),
    Flag(
        "--max-model-len",
        type=int,
        default=Unset("the model's context length"),
        help="longest sequence in tokens",
    ),
    Flag(
        "--attention-backend",
        default="auto",
        choices=["auto", "cpu", "torch", "triton"],
        help="kernels; auto: triton on CUDA, cpu (C++, torch if it cannot build) elsewhere",
    ),
    Flag("--compile", action="store_true", help="torch.compile the model"),
    Flag(
        "--cuda-graphs",
        action="store_true",
        help="replay decode steps from CUDA graphs, on CUDA with triton",
    ),
    Flag(
        "--worker-id",
        default=host_and_pid,
        env="PAGODA_WORKER_ID",
        help="this worker's stable name, e.g. the pod name",
        shown="HOST-PID, here %(default)s",
    ),
    # An Unset default, so that --help never prints the secret.
    Flag(
        "--shared-secret",
        default=Unset("$PAGODA_SHARED_SECRET, else none"),
        help="the deployment's shared secret, presented to the scheduler",
    ),
    Flag(
        "--shared-secret-file",
        default=Unset("none"),
        env="PAGODA_SHARED_SECRET_FILE",
        metavar="PATH",
        help="a file holding the shared secret, e.g. a mounted Secret",
    ),
    Flag(
        "--http-host",
        default="127.0.0.1",
        env="PAGODA_WORKER_HTTP_HOST",
        help="address of /health, /ready and /metrics",
    ),
    Flag(
        "--http-port",
        type=int,
        default=DEFAULT_HTTP_PORT,
        env="PAGODA_WORKER_HTTP_PORT",
        help="port of the probes, 0 for any free port",
    ),
    Flag(
        "--drain-grace",
        type=float,
        default=30.0,
        env="PAGODA_DRAIN_GRACE",
        metavar="SECONDS",
        help="after SIGTERM, how long the worker keeps running the sequences it holds (the "
        "scheduler sends it nothing new) before the rest move to other replicas",
    ),
    Flag(
        "--threads",
        type=int,
        default=default_threads,
        help="torch threads: the cores it may use (its affinity mask, capped by a cgroup "
        "CPU limit) // $PAGODA_LOCAL_WORKERS (default 1), at least 1",
        shown="%(default)s here",
    ),
    Flag(
        "--cpu-runtime",
        default="plain",
        env="PAGODA_CPU_RUNTIME",
        choices=["plain", "tuned"],
        help="plain: the process's own allocator and OpenMP; tuned: on a CPU, restart once "
        "with tcmalloc and Intel OpenMP (libiomp5) preloaded where they are found",
    ),
    Flag(
        "--cpu-threads-bind",
        default="nobind",
        env="PAGODA_CPU_THREADS_BIND",
        type=threads_bind_spec,
        metavar="auto|nobind|CPUS",
        help="on a CPU, bind compute thread i to one core: auto binds one per CPU of the "
        "affinity mask when the worker computes on all of them; a list (0-3,6); nobind",
    ),
    Flag(
        "--log-level",
        default="INFO",
        env="PAGODA_LOG_LEVEL",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="any case",
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``pagoda worker`` flags.

    Every default is shown by the help text itself (``add_flags``), so under any
    formatter; one decided at run time is an ``Unset``, which says by what.
    """
    add_flags(parser, FLAGS)


def run(args: argparse.Namespace) -> int:
    """Start the worker and block until it exits; returns the exit code."""
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT, stream=sys.stderr)
    # Before torch loads: a preload needs a fresh process, and OpenMP and MKL read the
    # thread counts once, when they start.
    runtime = settle(args.cpu_runtime, args.device)
    log.info("worker %s runtime: %s", args.worker_id, runtime)
    threads = max(1, args.threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    try:
        model = Path(given(args.model) or default_model_path())
        identity = identity_of(model)  # metadata only: a wrong path fails before the load
    except (OSError, ModelCardError, ValueError) as exc:
        log.error("worker %s: %s", args.worker_id, exc)
        return 1
    try:
        settings = _settings(args)
    except ValueError as exc:
        log.error("worker %s: %s", args.worker_id, exc)
        return 1
    service = WorkerService(settings)
    previous = _on_signals(service.stop)
    try:
        return _start(service, args, model, identity, threads)
    finally:
        service.close()
        _restore_signals(previous)


def _start(
    service: WorkerService, args: argparse.Namespace, model: Path, identity: str, threads: int
) -> int:
    try:
        host, port = service.start_probes()
    except OSError as exc:
        log.error("worker %s cannot serve probes: %s", args.worker_id, exc)
        return 1
    log.info("worker %s http=%s:%d", args.worker_id, host, port)
    loaded = _load(args, model, identity, threads)
    if loaded is None:
        return 1
    return service.serve(*loaded)


def _settings(args: argparse.Namespace) -> WorkerSettings:
    return WorkerSettings(
        scheduler=args.scheduler,
        worker_id=args.worker_id,
        shared_secret=read_secret(
            given(args.shared_secret), given(args.shared_secret_file), "PAGODA_SHARED_SECRET"
        ),
        http_host=args.http_host,
        http_port=args.http_port,
        drain_grace_s=max(0.0, args.drain_grace),
    )


def _load(
    args: argparse.Namespace, model: Path, identity: str, threads: int
) -> tuple[Runner, ModelInfo] | None:
    """Import torch (now that the thread count is set) and load the runner."""
    import torch

    torch.set_num_threads(threads)
    from worker_svc.model_runner import ModelRunner

    try:
        runner = ModelRunner(
            model,
            dtype=args.dtype,
            device=args.device,
            block_size=args.block_size,
            num_kv_blocks=given(args.num_kv_blocks),
            kv_cache_memory=given(args.kv_cache_memory),
            max_model_len=given(args.max_model_len),
            attention_backend=args.attention_backend,
            compile=args.compile,
            cuda_graphs=args.cuda_graphs,
            show_progress=sys.stderr.isatty(),
        )
    except (OSError, ValueError, RuntimeError) as exc:
        log.error("worker %s cannot load %s: %s", args.worker_id, model, exc)
        return None
    if runner.device.type == "cpu":  # the device the runner resolved, not a guess
        try:
            bound = bind_threads(args.cpu_threads_bind, threads)
        except ValueError as exc:  # a CPU list outside the process's affinity mask
            log.error("worker %s: %s", args.worker_id, exc)
            return None
        log.info("worker %s: %s", args.worker_id, bound)
    return runner, _model_info(runner, identity)


def _model_info(runner: Any, identity: str) -> ModelInfo:
    import torch

    device = runner.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return ModelInfo(
        identity=identity,
        vocab_size=runner.vocab_size,
        eos_token_ids=tuple(runner.eos_token_ids),
        max_model_len=runner.max_model_len,
        num_kv_blocks=runner.num_kv_blocks,
        block_size=runner.block_size,
        dtype=str(runner.dtype).removeprefix("torch."),
        device=str(device),
    )


def _on_signals(stop: Callable[[], None]) -> dict[int, Any]:
    """SIGTERM and SIGINT stop the service (Python allows handlers in the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, lambda *_: stop()) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)
