"""``pagoda serve`` is ready only once its workers can take a step, and its gateway
shows the scheduler's load under vLLM's names.

The worker of a real ``pagoda serve`` stack is held at its start (tests/e2e/held_worker:
the process waits for a file before it loads anything), so the gateway and the
scheduler are up long before any replica exists. Meanwhile ``/ready`` says 503 and a
request waits in the scheduler's queue, which the gateway's ``/metrics`` shows as
``vllm:num_requests_waiting``. Released, the worker warms up, says Hello, and
``/ready`` turns 200; while the request runs the gateway shows it running, with KV
blocks in use, as the scheduler counts them.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from pagoda.announcements import GATEWAY_LISTENING
from tests.e2e.stack import Process, pagoda_processes, slow_model

HELD_WORKER = Path(__file__).parent / "held_worker"
MAX_TOKENS = 600
MODEL_NAME = 'model_name="slow-llama"'


def eventually(check, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError("never got there")
        time.sleep(0.05)
    return value


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}


def ready(url: str) -> tuple[int, str]:
    answer = httpx.get(f"{url}/ready", timeout=10, trust_env=False)
    return answer.status_code, answer.text


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return slow_model(tmp_path_factory.mktemp("e2e-serve-ready"))


def test_serve_is_ready_once_its_worker_can_step_and_shows_the_schedulers_load(model, tmp_path):
    release = tmp_path / "release-the-worker"
    path = os.pathsep.join(p for p in (str(HELD_WORKER), os.environ.get("PYTHONPATH")) if p)
    serve = Process(
        ["serve", "--workers", "1", "--port", "0", "--grpc-port", "0", "--model", str(model),
         "--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory", "64MiB"],
        env={"PYTHONPATH": path, "HOLD_WORKER_UNTIL": str(release)}, name="pagoda serve",
    )  # fmt: skip
    try:
        url = "http://" + serve.wait_for(GATEWAY_LISTENING.pattern).group(1)
        scheduler = "http://" + serve.wait_for(r"\[scheduler\].*http=(\S+)").group(1)
        eventually(lambda: metrics(url).get("pagoda_gateway_session_up") == 1)
        # The session is open, the worker is held before it even loads: not ready.
        for _ in range(5):
            assert ready(url) == (503, "not ready: 0 of 1 worker replicas are live\n")
        answers: list[httpx.Response] = []
        body = {"prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        request = threading.Thread(
            target=lambda: answers.append(
                httpx.post(f"{url}/v1/completions", json=body, timeout=600, trust_env=False)
            )
        )
        request.start()
        # The request waits in the scheduler's queue; the gateway shows the queue.
        eventually(lambda: metrics(url).get(f"vllm:num_requests_waiting{{{MODEL_NAME}}}") == 1)
        assert metrics(scheduler)[f"vllm:num_requests_waiting{{{MODEL_NAME}}}"] == 1
        assert metrics(url)["pagoda_gateway_requests_in_flight"] == 1
        assert ready(url)[0] == 503
        assert not re.search(r"registered replica=", "".join(serve.lines))

        release.touch()
        serve.wait_for(r"pagoda is serving with 1 worker", timeout=300)
        eventually(lambda: ready(url) == (200, "ready\n"))
        # While the request runs, the gateway shows the scheduler's figures.
        running = f"vllm:num_requests_running{{{MODEL_NAME}}}"
        seen = eventually(lambda: (m := metrics(url)).get(running) == 1 and m)
        assert seen[f"vllm:num_requests_waiting{{{MODEL_NAME}}}"] == 0
        assert 0 < seen[f"vllm:kv_cache_usage_perc{{{MODEL_NAME}}}"] <= 1
        assert seen["pagoda_gateway_scheduler_live_replicas"] == 1
        request.join(600)
        [answer] = answers
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == MAX_TOKENS
        eventually(lambda: metrics(url).get(running) == 0)
        assert metrics(url)[f"vllm:kv_cache_usage_perc{{{MODEL_NAME}}}"] == 0

        # The worker warmed up before its Hello, so the replica stepped at once.
        worker = [line for line in serve.lines if line.startswith("[worker-0]")]
        warmed = [i for i, line in enumerate(worker) if "warmed up in" in line]
        hello = [i for i, line in enumerate(worker) if "sent hello" in line]
        assert warmed and hello and warmed[0] < hello[0], serve.log
    finally:
        release.touch()
        assert serve.stop() == 0, serve.log
    assert not pagoda_processes(str(model)), "a child of pagoda serve outlived it"
