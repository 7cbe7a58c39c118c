"""The probe port: /health, /ready and /metrics from the service's own callbacks."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry, Gauge

from pagoda.probes import ProbeServer


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_probes_answer_from_callbacks_and_refresh_metrics_on_scrape():
    registry = CollectorRegistry()
    gauge = Gauge("pagoda_test_value", "a value refreshed on scrape", registry=registry)
    state = {"healthy": True, "ready": False, "scrapes": 0}

    def refresh() -> None:
        state["scrapes"] += 1
        gauge.set(state["scrapes"])

    server = ProbeServer(
        "127.0.0.1", 0, health=lambda: state["healthy"], ready=lambda: state["ready"],
        registry=registry, before_scrape=refresh,
    ).start()  # fmt: skip
    try:
        assert get(server.port, "/health")[0] == 200
        assert get(server.port, "/ready")[0] == 503
        state["ready"], state["healthy"] = True, False
        assert get(server.port, "/ready")[0] == 200
        assert get(server.port, "/health")[0] == 503
        status, text = get(server.port, "/metrics")
        assert status == 200 and "pagoda_test_value 1.0" in text
        assert "pagoda_test_value 2.0" in get(server.port, "/metrics")[1]
        assert get(server.port, "/nope")[0] == 404
    finally:
        server.stop()


def test_a_failing_callback_is_an_error_answer_not_a_dead_server():
    def broken() -> bool:
        raise RuntimeError("loop state unreadable")

    server = ProbeServer(
        "127.0.0.1", 0, health=broken, ready=lambda: True, registry=CollectorRegistry()
    ).start()
    try:
        status, body = get(server.port, "/health")
        assert status == 500 and "unreadable" in body
        assert get(server.port, "/ready")[0] == 200
    finally:
        server.stop()
