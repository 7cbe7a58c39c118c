"""The gateway and the scheduler run from the base install alone, as in the slim image.

A virtual environment with pagoda's base dependencies only (``.cache/slim-venv``,
pinned by requirements/lock.txt like the image) has no torch and no
transformers; ``pagoda prepare-model`` there says it needs a full install. A scheduler
and a gateway started from it, with a worker from the full environment, serve the
tiny random Llama (fp32) to the official ``openai`` client and to a gRPC client, and
every greedy answer equals the offline ``pagoda.LLM``'s.

The environment is built (by the project's uv) once and reused while pyproject.toml,
the lock and the interpreter are unchanged (a stamp file holds their hash).
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import openai
import pytest

from pagoda import LLM, SamplingParams
from pagoda.default_model import default_model_path
from pagoda.v1 import api_pb2, api_pb2_grpc, common_pb2
from tests.e2e.stack import REPO, Gateway, Scheduler, Worker, tiny_model
from tests.lock import LOCK

SLIM_VENV = REPO / ".cache" / "slim-venv"
STAMP = SLIM_VENV / "pagoda-stamp"
MAX_TOKENS = 12
PROMPTS = ["The quick brown fox", "Once upon a time, in a land", "abc"]


def _stamp() -> str:
    digest = hashlib.sha256(sys.version.encode())
    for path in (REPO / "pyproject.toml", LOCK):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _run(argv: list[str], timeout: float = 900) -> None:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        pytest.fail(f"`{' '.join(argv)}` failed ({out.returncode}):\n{out.stdout}{out.stderr}")


@pytest.fixture(scope="session")
def slim_python() -> Path:
    """The python of a virtual environment with pagoda's base dependencies only."""
    python = SLIM_VENV / "bin" / "python"
    SLIM_VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(SLIM_VENV.parent / "slim-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building it
        stamp = _stamp()
        if not (python.exists() and STAMP.is_file() and STAMP.read_text() == stamp):
            shutil.rmtree(SLIM_VENV, ignore_errors=True)
            uv = str(Path(sys.executable).with_name("uv"))
            _run([uv, "--quiet", "venv", "--python", sys.executable, str(SLIM_VENV)])
            _run([uv, "--quiet", "pip", "install", "--python", str(python), "--constraints",
                  str(LOCK), "--build-constraints", str(LOCK), "-e", str(REPO)])  # fmt: skip
            STAMP.write_text(stamp)
    return python


def test_the_slim_environment_has_no_torch(slim_python, tmp_path):
    for module in ("torch", "transformers", "triton", "safetensors", "gguf"):
        out = subprocess.run(
            [str(slim_python), "-c", f"import {module}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode != 0 and f"No module named '{module}'" in out.stderr, module
    # ... while the gateway and the scheduler import from the install itself.
    out = subprocess.run(
        [str(slim_python), "-c",
         "import gateway.server, scheduler_svc.server, pagoda.entrypoints.cli"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr


def test_prepare_model_says_it_needs_a_full_install(slim_python, tmp_path):
    model = default_model_path()  # the full environment's GGUF file
    out = subprocess.run(
        [str(slim_python), "-m", "pagoda", "prepare-model", str(model), str(tmp_path / "card")],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert "needs a full install (pip install 'pagoda[worker]')" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "card" / "model.json").exists()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("e2e-slim"))


@pytest.fixture(scope="module")
def card(model, tmp_path_factory) -> Path:
    """The model's card, written by the full environment (as the image's build does)."""
    card = tmp_path_factory.mktemp("e2e-slim-card") / "card"
    _run([sys.executable, "-m", "pagoda", "prepare-model", str(model), str(card)], timeout=300)
    return card


@pytest.fixture(scope="module")
def stack(slim_python, model, card):
    slim = [str(slim_python)]
    started = []
    try:
        scheduler = Scheduler(card, extra=["--seed", "0"], launcher=slim)
        started.append(scheduler)
        worker = Worker(model, scheduler.step_addr, "slim-roles-worker",
                        extra=["--kv-cache-memory", "64MiB", "--threads", "1"])  # fmt: skip
        started.append(worker)
        gateway = Gateway(card, scheduler.grpc_addr, launcher=slim)
        started.append(gateway)
        yield scheduler, worker, gateway
    finally:
        codes = {p.name: p.stop() for p in reversed(started)}
    assert all(code == 0 for code in codes.values()), codes


@pytest.fixture(scope="module")
def offline(model):
    return LLM(model, dtype="float32", show_progress=False)


@pytest.fixture(scope="module")
def client(stack):
    _, _, gateway = stack
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0)


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, **kwargs)


def mapped_files(pid: int) -> set[str]:
    """The files a process has mapped: its interpreter, shared libraries, extensions."""
    with open(f"/proc/{pid}/maps") as maps:
        return {line.split(None, 5)[5].strip() for line in maps if len(line.split()) == 6}


def test_the_roles_run_on_the_slim_environment(stack):
    scheduler, worker, gateway = stack
    for process in (scheduler, gateway):
        files = mapped_files(process.proc.pid)
        assert any(f.startswith(f"{SLIM_VENV}/") for f in files), process.name
        assert not any("torch" in f for f in files), f"{process.name} loaded torch"
    assert any("torch" in f for f in mapped_files(worker.proc.pid))  # the check can see it


def test_completions_equal_the_offline_engine(client, offline):
    model_name = client.models.list().data[0].id
    want = offline.generate(PROMPTS, greedy(), use_tqdm=False)
    for prompt, ref in zip(PROMPTS, want, strict=True):
        got = client.completions.create(
            model=model_name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        choice, output = got.choices[0], ref.outputs[0]
        assert (choice.text, choice.finish_reason) == (output.text, output.finish_reason)
        assert got.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert got.usage.completion_tokens == len(output.token_ids)


def test_chat_equals_the_offline_engine(client, offline):
    model_name = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    ref = offline.chat(messages, greedy(), use_tqdm=False)[0]
    got = client.chat.completions.create(
        model=model_name, messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    assert got.choices[0].message.content == ref.outputs[0].text
    assert got.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert got.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert got.usage.completion_tokens == len(ref.outputs[0].token_ids)
    stream = client.chat.completions.create(
        model=model_name, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == ref.outputs[0].text


def test_grpc_token_ids_equal_the_offline_engine(stack, offline):
    _, _, gateway = stack
    prompt = offline.get_tokenizer().encode(PROMPTS[0])
    ref = offline.generate({"prompt_token_ids": prompt}, greedy(ignore_eos=True), use_tqdm=False)[
        0
    ].outputs[0]
    with grpc.insecure_channel(gateway.grpc_addr) as channel:
        request = api_pb2.GenerateRequest(
            token_ids=api_pb2.TokenIds(ids=prompt),
            sampling=common_pb2.SamplingParams(
                temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True
            ),
            return_token_ids=True,
        )
        tokens = [
            t
            for response in api_pb2_grpc.GenerationStub(channel).Generate(request, timeout=60)
            for choice in response.choices
            for t in choice.token_ids
        ]
    assert tokens == list(ref.token_ids)
