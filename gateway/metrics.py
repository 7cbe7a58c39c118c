"""The gateway's Prometheus metrics, under vLLM's names where vLLM has one.

Inference gateways and dashboards built for vLLM read ``vllm:*`` series, so request
outcomes, token counts and latencies use vLLM's names, label (``model_name``) and
histogram buckets; what only pagoda has is ``pagoda_gateway_*``. Each gateway object
owns its registry, so several can live in one process (tests).

The queue, the running sequences and the KV usage (``vllm:num_requests_waiting``,
``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``) are the scheduler's
global figures, which it sends down the session (``SchedulerLoad``): an endpoint
picker that scrapes the gateways, as the Gateway API Inference Extension does, reads
them where it would read a vLLM server's. Every gateway shows the same figures, so
dashboards take their ``max``, never their ``sum``. The gateway's own requests in
flight are ``pagoda_gateway_requests_in_flight``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from pagoda.v1 import session_pb2

# vLLM's buckets (vllm/v1/metrics/loggers.py).
_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
_E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


@dataclass(frozen=True)
class FinishedRequest:
    """What the metrics read of a request whose samples have all ended."""

    finish_reasons: list[str]
    prompt_tokens: int
    generation_tokens: int
    # Tokens of its longest sample: the time per output token is measured along it.
    longest_sample: int
    # time.monotonic() at its arrival, first and last token, and end.
    arrival: float
    first_token_at: float | None
    last_token_at: float | None
    finished_at: float


class Metrics:
    """Counters and histograms of one gateway; ``render()`` is the /metrics body."""

    def __init__(self, model_name: str) -> None:
        disable_created_metrics()  # no *_created series, as vLLM
        self.registry = CollectorRegistry()
        self._model = model_name
        reg = self.registry
        self._success = Counter(
            "vllm:request_success",
            "Sequences that finished, by finish reason.",
            ["model_name", "finished_reason"],
            registry=reg,
        )
        self._prompt_tokens = Counter(
            "vllm:prompt_tokens",
            "Prompt tokens of finished requests.",
            ["model_name"],
            registry=reg,
        )
        self._generation_tokens = Counter(
            "vllm:generation_tokens",
            "Tokens generated for finished requests.",
            ["model_name"],
            registry=reg,
        )
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Seconds from arrival at the gateway to the first generated token.",
            ["model_name"],
            buckets=_TTFT_BUCKETS,
            registry=reg,
        )
        self._tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Mean seconds between output tokens of a request, after the first.",
            ["model_name"],
            buckets=_TPOT_BUCKETS,
            registry=reg,
        )
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Seconds from arrival at the gateway to the request's last token.",
            ["model_name"],
            buckets=_E2E_BUCKETS,
            registry=reg,
        )
        self.in_flight = Gauge(
            "pagoda_gateway_requests_in_flight",
            "Requests in flight through this gateway (queued or running at the scheduler).",
            registry=reg,
        )
        self._waiting = Gauge(
            "vllm:num_requests_waiting",
            "Sequences waiting in the scheduler's global queue (the scheduler's figure, "
            "0 without a session).",
            ["model_name"],
            registry=reg,
        )
        self._running = Gauge(
            "vllm:num_requests_running",
            "Sequences running on some replica (the scheduler's figure, 0 without a session).",
            ["model_name"],
            registry=reg,
        )
        self._kv_usage = Gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage over all replicas, 0..1 (the scheduler's figure, 0 without a session).",
            ["model_name"],
            registry=reg,
        )
        self._live_replicas = Gauge(
            "pagoda_gateway_scheduler_live_replicas",
            "Replicas taking new work, as the scheduler last said (0 without a session).",
            registry=reg,
        )
        self.scheduler_load(None)
        self.session_up = Gauge(
            "pagoda_gateway_session_up",
            "1 while the session to the scheduler is open.",
            registry=reg,
        )
        self._requests = Counter(
            "pagoda_gateway_requests",
            "API requests answered, by API (rest, grpc) and status (HTTP code or gRPC code).",
            ["api", "status"],
            registry=reg,
        )
        self._aborted = Counter(
            "pagoda_gateway_requests_aborted",
            "Requests aborted at the scheduler because their client went away.",
            registry=reg,
        )
        self._timed_out = Counter(
            "pagoda_gateway_requests_timed_out",
            "Requests aborted at the scheduler because their deadline passed (answered 504).",
            registry=reg,
        )
        self.engine_stalled = Gauge(
            "pagoda_gateway_scheduler_not_serving",
            "1 while the scheduler's gRPC health says NOT_SERVING (a stalled engine, or "
            "shutting down); new requests are answered 503 meanwhile.",
            registry=reg,
        )

    def track_in_flight(self, count: Callable[[], float]) -> None:
        """Read the number of requests in flight at scrape time."""
        self.in_flight.set_function(count)

    def scheduler_load(self, load: session_pb2.SchedulerLoad | None) -> None:
        """Show the scheduler's latest load; None (no session) shows zeros."""
        load = load or session_pb2.SchedulerLoad()
        model = self._model
        self._waiting.labels(model).set(load.num_waiting)
        self._running.labels(model).set(load.num_running)
        self._kv_usage.labels(model).set(load.kv_cache_usage)
        self._live_replicas.set(load.num_live_replicas)

    def request_finished(self, request: FinishedRequest) -> None:
        model = self._model
        for reason in request.finish_reasons:
            self._success.labels(model, reason).inc()
        self._prompt_tokens.labels(model).inc(request.prompt_tokens)
        self._generation_tokens.labels(model).inc(request.generation_tokens)
        self._e2e.labels(model).observe(request.finished_at - request.arrival)
        first, last = request.first_token_at, request.last_token_at
        if first is None or last is None:
            return
        self._ttft.labels(model).observe(first - request.arrival)
        if request.longest_sample > 1:
            self._tpot.labels(model).observe((last - first) / (request.longest_sample - 1))

    def request_aborted(self) -> None:
        self._aborted.inc()

    def request_timed_out(self) -> None:
        self._timed_out.inc()

    def answered(self, api: str, status: str) -> None:
        self._requests.labels(api, status).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
