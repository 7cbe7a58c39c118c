"""What the Kubernetes deployment relies on, checked against real processes.

A real stack (``pagoda scheduler``, ``pagoda worker``, ``pagoda gateway``) serves the
tiny test model the way the model-pvc component does: the gateway and the scheduler
read a card that ``prepare-model`` wrote, the worker the weights. After one request
(so that the latency histograms have samples) the three ``/metrics`` endpoints are
scraped, and every metric name the Grafana dashboard and the Prometheus Adapter rules
read must be one that a service really exposes, under the name Prometheus stores
(a counter's ``_total``, a histogram's ``_bucket``). Then readiness: a gateway is
ready with a scheduler and no worker at all, and stays ready when the last worker
drains away, so scaling workers to zero never empties the gateways' Service.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from pagoda.v1.session_pb2 import ReplicaStats
from tests.deploy import k8s
from tests.e2e.stack import Gateway, Scheduler, Worker, tiny_model

SCHEDULER_FLAGS = ["--max-model-len", "512", "--seed", "0"]
WORKER_FLAGS = ["--kv-cache-memory", "64MiB", "--threads", "1"]


def get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=10)


def eventually(check, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("runtime-contract"))


@pytest.fixture(scope="module")
def card(model, tmp_path_factory):
    """The card the model-pvc component's Job writes: prepare-model of the weights."""
    from pagoda.model_card.writer import prepare_model_card

    out = tmp_path_factory.mktemp("card") / "card"
    prepare_model_card(model, out)
    return out


@pytest.fixture(scope="module")
def stack(model, card):
    started = []
    try:
        scheduler = Scheduler(card, extra=SCHEDULER_FLAGS)
        started.append(scheduler)
        worker = Worker(model, scheduler.step_addr, "worker-metrics", extra=WORKER_FLAGS)
        started.append(worker)
        worker.http_addr = worker.wait_for(r"worker \S+ http=(\S+)").group(1)
        gateway = Gateway(card, scheduler.grpc_addr)
        started.append(gateway)
        yield scheduler, worker, gateway
    finally:
        for process in reversed(started):
            process.kill()


@pytest.fixture(scope="module")
def scrapes(stack) -> dict[str, str]:
    """Each service's /metrics text after one completed request."""
    scheduler, worker, gateway = stack
    answer = httpx.post(
        f"{gateway.base_url}/v1/completions",
        json={"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    return {
        "scheduler": get(f"http://{scheduler.http_addr}/metrics").text,
        "worker": get(f"http://{worker.http_addr}/metrics").text,
        "gateway": get(f"{gateway.base_url}/metrics").text,
    }


@pytest.fixture(scope="module")
def exposed(scrapes) -> dict[str, dict[str, str]]:
    """Service -> every metric name its /metrics makes Prometheus store, with its type."""
    return {service: k8s.exposed_names(text) for service, text in scrapes.items()}


def names_of(exposed: dict, *services: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for service in services:
        out |= exposed[service]
    return out


def test_the_request_left_samples_in_the_histograms(scrapes):
    for service, name in (("gateway", "vllm:time_to_first_token_seconds_count"),
                          ("gateway", "vllm:time_per_output_token_seconds_count"),
                          ("scheduler", "pagoda_step_seconds_count"),
                          ("worker", "pagoda_worker_step_seconds_count")):  # fmt: skip
        counts = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", scrapes[service], re.M)
        assert counts and float(counts[0]) >= 1, f"{service}: {name} has no sample"


def test_the_adapter_series_is_a_scheduler_gauge(exposed):
    """The HPA's metric: each Prometheus Adapter rule reads a gauge that the scheduler
    exports (the workers' HPA must follow the scheduler's queue). The gateways show the
    same global figure under the same name (for endpoint pickers), so a rule over such
    a name takes the max of its series, never the sum; the workers export none."""
    scheduler = exposed["scheduler"]
    rules = k8s.adapter_external_rules()
    assert rules
    for rule in rules:
        assert scheduler.get(rule.series) == "gauge", (
            f"{rule.series} (adapter rule for {rule.name}) is not a scheduler gauge"
        )
        assert rule.series not in exposed["worker"], f"{rule.series} would mix in workers"
        if rule.series in exposed["gateway"]:
            assert exposed["gateway"][rule.series] == "gauge"
            query = rule.rule["metricsQuery"]
            assert query.startswith("max("), f"{rule.name}: {query} counts each gateway"


def test_the_queue_metric_reads_the_waiting_sequences(stack, exposed):
    """The value behind the HPA is the scheduler's queue: 0 once the request is done."""
    scheduler, _, gateway = stack
    [rule] = [r for r in k8s.adapter_external_rules() if r.name.endswith("requests_waiting")]
    text = get(f"http://{scheduler.http_addr}/metrics").text
    values = re.findall(rf"^{re.escape(rule.series)}{{[^}}]*}} (\S+)$", text, re.M)
    assert values == ["0.0"]
    assert scheduler.stats().num_waiting == 0
    # The gateway shows the scheduler's figure, not a count of its own.
    text = get(f"{gateway.base_url}/metrics").text
    values = re.findall(rf"^{re.escape(rule.series)}{{[^}}]*}} (\S+)$", text, re.M)
    assert values == ["0.0"]


def test_every_dashboard_metric_is_exposed(exposed):
    dashboard = json.loads(k8s.DASHBOARD.read_text())
    available = names_of(exposed, "scheduler", "worker", "gateway")
    missing = {
        expr: sorted(names - set(available))
        for expr, names in k8s.grafana_metric_names(dashboard).items()
        if names - set(available)
    }
    assert not missing, f"names no service exposes: {missing}"
    used = set().union(*k8s.grafana_metric_names(dashboard).values())
    assert len(used) >= 20


def test_a_gateway_with_no_worker_is_ready(card):
    """Workers scaled to zero: the scheduler and the gateway stay ready, so the
    gateways' Service keeps its endpoints and requests wait in the queue."""
    scheduler = gateway = None
    try:
        scheduler = Scheduler(card, extra=SCHEDULER_FLAGS)
        gateway = Gateway(card, scheduler.grpc_addr, ready=False)
        assert eventually(lambda: get(f"{gateway.base_url}/ready").status_code == 200), (
            f"a gateway without workers is not ready:\n{gateway.log}"
        )
        assert get(f"http://{scheduler.http_addr}/ready").status_code == 200
        assert get(f"{gateway.base_url}/health").status_code == 200
        metrics = get(f"http://{scheduler.http_addr}/metrics").text
        assert re.search(r"^pagoda_replicas_live 0\.0$", metrics, re.M)
    finally:
        for process in (gateway, scheduler):
            if process is not None:
                process.kill()


def test_the_gateway_stays_ready_when_the_last_worker_drains(stack, exposed):
    scheduler, worker, gateway = stack
    assert worker.stop() == 0  # SIGTERM: the worker drains and leaves
    assert eventually(
        lambda: not [r for r in scheduler.stats().replicas if r.state == ReplicaStats.ACTIVE]
    )
    for _ in range(20):  # two seconds, well past a probe period of the gateway's
        assert get(f"{gateway.base_url}/ready").status_code == 200
        time.sleep(0.1)
    assert get(f"http://{scheduler.http_addr}/ready").status_code == 200
