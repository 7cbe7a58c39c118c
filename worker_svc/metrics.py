"""The worker's Prometheus metrics: the main loop observes them as they happen, the
probe server's thread serves them on ``/metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class WorkerMetrics:
    """The worker's Prometheus metrics, in a registry of its own (one per service)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.steps = Counter("pagoda_worker_steps", "Plans computed.", registry=r)
        self.step_errors = Counter(
            "pagoda_worker_step_errors",
            "Plans refused or failed, by StepError kind.",
            ["kind"],
            registry=r,
        )
        self.step_seconds = Histogram(
            "pagoda_worker_step_seconds",
            "Compute time of one step (the result's compute_seconds).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.running_sequences = Gauge(
            "pagoda_worker_running_sequences", "Sequences whose state the worker holds.", registry=r
        )
        self.kv_blocks = Gauge("pagoda_worker_kv_blocks", "KV-cache blocks held.", registry=r)
        self.registered = Gauge(
            "pagoda_worker_registered", "1 while the worker holds a Welcome.", registry=r
        )
        self.step_running = Gauge(
            "pagoda_worker_step_running", "1 while a step is being computed.", registry=r
        )
        self.kernels = Gauge(
            "pagoda_worker_kernels",
            "1 for the kernels the model runs on (e.g. 'cpu (avx512_bf16)', or 'torch' where "
            "the CPU extension could not be built).",
            ["backend"],
            registry=r,
        )
        self.tokens = Counter("pagoda_worker_tokens", "Tokens sampled.", registry=r)
