"""The scheduler's Prometheus metrics: vLLM's names for what inference gateways read, and
pagoda's own.

The values come from one snapshot of the scheduler's state that the service takes on
its event loop when ``/metrics`` is scraped (``ProbeServer``'s ``before_scrape``); the
probe thread then only reads that snapshot, never the live core. The step-time
histogram is the one metric observed as it happens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagoda.v1 import session_pb2
from scheduler_svc.replicas import ACTIVE, DRAINING, STATE_NAMES

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Snapshot:
    """What one scrape reports; built on the event loop, read by the probe thread."""

    stats: session_pb2.StatsResponse = field(default_factory=session_pb2.StatsResponse)
    stalled: bool = False


class SchedulerMetrics:
    """The service's own registry (never the global one, so tests and processes don't mix)."""

    def __init__(self, model_name: str, block_size: int, prefix_caching: bool):
        self.registry = CollectorRegistry()
        self.step_seconds = Histogram(
            "pagoda_step_seconds",
            "Round trip of one step: plan sent to result applied, in seconds.",
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.snapshot = Snapshot()
        self.registry.register(_SnapshotCollector(self, model_name, block_size, prefix_caching))


class _SnapshotCollector(Collector):
    def __init__(
        self, metrics: SchedulerMetrics, model_name: str, block_size: int, prefix_caching: bool
    ):
        self._metrics = metrics
        self._model = model_name
        self._block_size = block_size
        self._prefix_caching = prefix_caching

    def collect(self) -> Iterator[Metric]:
        snapshot = self._metrics.snapshot
        stats = snapshot.stats
        load = load_of(stats)
        blocks = sum(r.num_blocks for r in stats.replicas if _holds_blocks(r))
        yield from self._vllm(load, blocks)
        live = [r for r in stats.replicas if r.state == ACTIVE]
        yield _gauge(
            "pagoda_replicas_live",
            "Replicas taking new work (registered, not draining).",
            load.num_live_replicas,
        )
        yield _gauge(
            "pagoda_capacity_blocks",
            "KV blocks of the replicas taking new work.",
            sum(r.num_blocks for r in live),
        )
        yield _gauge("pagoda_sessions", "Open gateway sessions.", stats.num_sessions)
        yield _gauge(
            "pagoda_waiting_prompt_tokens",
            "Tokens of the sequences in the waiting queue.",
            stats.num_waiting_tokens,
        )
        yield _gauge(
            "pagoda_prefix_cache_hit_rate",
            "Prefix-cache hits over queries, in blocks, since start, over all replicas.",
            stats.prefix_cache_hit_rate,
        )
        yield CounterMetricFamily(
            "pagoda_preemptions",
            "Sequences preempted (to be recomputed) since start.",
            value=stats.num_preemptions,
        )
        yield _gauge(
            "pagoda_scheduler_stalled",
            "1 while work is pending on live replicas and no step has completed for the stall "
            "timeout.",
            int(snapshot.stalled),
        )
        yield from _replica_metrics(stats)

    def _vllm(self, load: session_pb2.SchedulerLoad, blocks: int) -> Iterator[Metric]:
        labels = ["model_name"]
        for name, doc, value in (
            ("vllm:num_requests_waiting", "Sequences waiting to be scheduled.", load.num_waiting),
            ("vllm:num_requests_running", "Sequences running on some replica.", load.num_running),
            (
                "vllm:kv_cache_usage_perc",
                "KV-cache usage over all live replicas, 0..1.",
                load.kv_cache_usage,
            ),
        ):
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric([self._model], value)
            yield family
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Cache configuration: block size and KV blocks of all live replicas.",
            labels=["block_size", "num_gpu_blocks", "enable_prefix_caching"],
        )
        info.add_metric([str(self._block_size), str(blocks), str(self._prefix_caching)], 1)
        yield info


def _replica_metrics(stats: session_pb2.StatsResponse) -> Iterator[Metric]:
    counts = dict.fromkeys(STATE_NAMES.values(), 0)
    kv = GaugeMetricFamily(
        "pagoda_replica_kv_usage",
        "Held KV blocks over all blocks, per live replica.",
        labels=["replica"],
    )
    running = GaugeMetricFamily(
        "pagoda_replica_running", "Sequences running, per live replica.", labels=["replica"]
    )
    hit_rate = GaugeMetricFamily(
        "pagoda_replica_prefix_cache_hit_rate",
        "Prefix-cache hits over queries, in blocks, in this registration, per live replica.",
        labels=["replica"],
    )
    for replica in stats.replicas:
        counts[STATE_NAMES[replica.state]] += 1
        if _holds_blocks(replica):
            label = [str(replica.replica_id)]
            kv.add_metric(label, replica.kv_usage)
            running.add_metric(label, replica.num_running)
            hit_rate.add_metric(label, replica.prefix_cache_hit_rate)
    replicas = GaugeMetricFamily(
        "pagoda_replicas", "Known replicas by state (dead ones stay listed).", labels=["state"]
    )
    for state, count in counts.items():
        replicas.add_metric([state], count)
    yield replicas
    yield kv
    yield running
    yield hit_rate


def load_of(stats: session_pb2.StatsResponse) -> session_pb2.SchedulerLoad:
    """The figures shown under vLLM's names, here and (sent down the sessions) on every
    gateway: one definition, so both say the same."""
    holding = [r for r in stats.replicas if _holds_blocks(r)]
    blocks = sum(r.num_blocks for r in holding)
    used = sum(r.num_blocks - r.num_free_blocks for r in holding)
    return session_pb2.SchedulerLoad(
        num_waiting=stats.num_waiting,
        num_running=stats.num_running,
        kv_cache_usage=used / blocks if blocks else 0.0,
        num_live_replicas=sum(1 for r in stats.replicas if r.state == ACTIVE),
    )


def _holds_blocks(replica: session_pb2.ReplicaStats) -> bool:
    """In the core: taking work, or draining and still running (a draining replica leaves
    the core as soon as it runs nothing, and is then listed with nothing held)."""
    return replica.state == ACTIVE or (replica.state == DRAINING and replica.num_running > 0)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)
