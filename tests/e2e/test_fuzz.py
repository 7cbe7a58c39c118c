"""The REST API fuzzed from its own ``/openapi.json`` by schemathesis, against a real
stack: ``pagoda scheduler``, ``pagoda worker`` and ``pagoda gateway`` (with an API key)
on the tiny random Llama, ``max_model_len`` 128.

Schemathesis runs its coverage phase (boundary values and every kind of wrong value,
field by field) and its fuzzing phase (``EXAMPLES`` cases per operation, valid and
invalid), with a fixed seed and one worker, so a run is repeatable. Its checks: no 5xx
(``no_server_error`` in tests/e2e/fuzz_hooks.py: a 504 only for a call whose own
deadline passed), every request that breaks the schema answered 4xx, every answer's
status, media type, headers and body as the schema says (streams event by event), the
API key enforced, 405 with ``Allow`` for a wrong method. ``positive_data_acceptance`` is
left out: a schema cannot say everything the server checks (the vocabulary, the
context length, fields that exclude each other), so a valid-looking body may still be
a 400. Generation calls that name no token budget get a small one (fuzz_hooks.py).
Afterwards the stack must still answer a normal completion.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from openai import OpenAI

from tests.e2e.stack import REPO, Gateway, Scheduler, Worker, tiny_model

SEED = 20261207
EXAMPLES = 100  # per operation, in the fuzzing phase
KEY = "fuzz-key"
CHECKS = (
    "no_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "ignored_auth",
)
OPERATIONS = {
    "POST /v1/completions",
    "POST /v1/chat/completions",
    "GET /v1/models",
    "GET /v1/models/{model}",
    "POST /tokenize",
    "POST /detokenize",
    "GET /health",
    "GET /ready",
    "GET /metrics",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    model = tiny_model(tmp_path_factory.mktemp("e2e-fuzz"))
    scheduler = Scheduler(model, extra=["--max-model-len", "128", "--seed", "0"])
    worker = Worker(model, scheduler.step_addr, "worker-fuzz",
                    extra=["--kv-cache-memory", "16MiB", "--threads", "1"])  # fmt: skip
    gateway = Gateway(model, scheduler.grpc_addr, extra=["--api-key", KEY])
    yield gateway
    for process in (gateway, worker, scheduler):
        assert process.stop() == 0, process.log


def _schemathesis(url: str, report: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [
        str(Path(sys.executable).with_name("st")), "run", f"{url}/openapi.json",
        "--checks", ",".join(CHECKS),
        "-H", f"Authorization: Bearer {KEY}",
        "--phases", "coverage,fuzzing",
        "--max-examples", str(EXAMPLES),
        "--seed", str(SEED),
        "--workers", "1",
        "--request-timeout", "60",
        # Generation speed depends on the machine's load, not on the API.
        "--suppress-health-check", "too_slow",
        "--generation-database", "none",
        "--no-color",
        "--report", "ndjson", "--report-ndjson-path", str(report),
    ]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.e2e.fuzz_hooks", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900, check=False)  # fmt: skip


def _answers(report: Path) -> dict[str, collections.Counter[int]]:
    """The statuses schemathesis saw, by operation (from its NDJSON event report)."""
    seen: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for line in report.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if not finished:
            continue
        recorder = finished["recorder"]
        for interaction in recorder["interactions"].values():
            response = interaction.get("response")
            if response is not None:
                seen[recorder["label"]][response["status_code"]] += 1
    return seen


def test_the_schema_fuzzer_finds_no_server_error_and_no_answer_off_the_schema(stack, tmp_path):
    gateway = stack
    report = tmp_path / "events.ndjson"
    run = _schemathesis(gateway.base_url, report, tmp_path)
    (tmp_path / "schemathesis.txt").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-3000:]
    # "No issues found" is left out when schemathesis also warns (e.g. that most bodies it
    # drew for an operation were refused), so read its count of test cases instead.
    cases = re.search(r"Test cases:\s*(\d+) generated, (\d+) passed(.*)", run.stdout)
    assert cases is not None, run.stdout[-3000:]
    assert cases[1] == cases[2] and "failed" not in cases[3], run.stdout[-3000:]
    seen = _answers(report)
    assert set(seen) == OPERATIONS
    for operation in ("POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize"):
        answered = seen[operation]
        assert answered[200] >= 20 and answered[400] >= 20, (operation, answered)
        assert sum(answered.values()) >= EXAMPLES, (operation, answered)
    assert all(status != 500 for counts in seen.values() for status in counts), seen
    log = "".join(gateway.lines)
    assert "Traceback" not in log, log[-5000:]

    client = OpenAI(base_url=f"{gateway.base_url}/v1", api_key=KEY, max_retries=0)
    served = client.models.list().data[0].id
    out = client.completions.create(
        model=served, prompt="Hello", max_tokens=4, extra_body={"ignore_eos": True}
    )
    assert out.usage is not None and out.usage.completion_tokens == 4
    assert out.choices[0].finish_reason == "length" and out.choices[0].text
