"""The scheduler as a process: its command line, its listening line, and SIGTERM's drain."""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest

from pagoda.model_card.card import ModelCard
from pagoda.v1 import common_pb2, session_pb2
from scheduler_svc import server
from tests.scheduler_svc.service_harness import (
    GatewaySession,
    StepWorker,
    asynctest,
    greedy,
    wait_until,
)
from tests.worker_svc.hf_oracle import VOCAB_SIZE, build_model, random_prompts

LISTENING = re.compile(r"scheduler listening grpc=(\S+):(\d+) step=(\S+):(\d+) http=(\S+):(\d+)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model("llama", tmp_path_factory.mktemp("scheduler-process"))


def test_every_flag_shows_its_default_and_the_secret_stays_hidden(monkeypatch, model_dir):
    monkeypatch.setenv("PAGODA_SHARED_SECRET", "hunter2")
    monkeypatch.setenv("PAGODA_STEP_PORT", "6000")
    monkeypatch.setenv("PAGODA_MODEL_CARD", str(model_dir))
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    server.add_arguments(parser)
    text = parser.format_help()
    assert "hunter2" not in text and "(default: 50061) (default" not in text
    for flag in ("--grpc-port", "--step-port", "--http-port", "--block-size", "--drain-grace"):
        assert flag in text
    assert "(default: 6000)" in text and "(default: 50061)" in text
    args = parser.parse_args([])
    card, config, settings = server.build(args)
    assert (settings.step_port, settings.shared_secret) == (6000, "hunter2")
    assert config.max_model_len == card.max_model_len == 512
    assert config.max_num_batched_tokens == 2048 and config.max_num_seqs == 256
    args = parser.parse_args(["--max-num-seqs", "4096", "--max-model-len", "100"])
    _, config, _ = server.build(args)
    assert (config.max_num_batched_tokens, config.max_model_len) == (4096, 100)


def test_bad_settings_exit_2_before_binding_anything(model_dir, capsys):
    base = ["--model", str(model_dir), "--shared-secret", ""]
    assert server.main(base + ["--host", "0.0.0.0"]) == 2
    assert "needs a shared secret" in capsys.readouterr().err
    assert server.main(base + ["--max-model-len", "4096"]) == 2
    assert "exceeds the model's maximum of 512" in capsys.readouterr().err


def test_the_service_modules_never_load_torch():
    code = (
        "import sys, scheduler_svc.server, scheduler_svc.service, scheduler_svc.workers\n"
        "names = ('torch', 'transformers', 'worker_svc', 'gateway', 'pagoda.entrypoints.llm')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


class Process:
    """A scheduler subprocess whose stderr is collected line by line."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode().rstrip("\n"))

    async def listening(self) -> re.Match[str]:
        await wait_until(lambda: any(LISTENING.search(x) for x in self.lines) or self.exited, 20)
        match = next((m for x in self.lines if (m := LISTENING.fullmatch(x))), None)
        assert match is not None, "\n".join(self.lines)
        return match

    @property
    def exited(self) -> bool:
        return self.proc.returncode is not None

    async def wait(self, timeout: float) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._reader
        return code


@asynctest
async def test_sigterm_drains_running_requests_drops_the_queue_and_exits_0(model_dir):
    from worker_svc.model_runner import ModelRunner

    card = ModelCard.load(model_dir)
    runner = ModelRunner(model_dir, dtype="float32", num_kv_blocks=64, show_progress=False)
    proc = Process(
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "scheduler_svc.server", "--model", str(model_dir),
            "--grpc-port", "0", "--step-port", "0", "--http-port", "0",
            "--max-num-seqs", "1", "--heartbeat-interval-ms", "100",
            "--heartbeat-timeout-ms", "2000", "--drain-grace", "20",
            stderr=asyncio.subprocess.PIPE,
        )
    )  # fmt: skip
    w = None
    try:
        match = await proc.listening()
        host, grpc_port, _, step_port, _, http_port = match.groups()
        assert host == "127.0.0.1" and all(int(p) > 0 for p in (grpc_port, step_port, http_port))
        w = StepWorker.for_runner(
            f"tcp://127.0.0.1:{step_port}", runner, card, "w0", step_delay_s=0.03
        ).start()
        await wait_until(lambda: w.registered)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            from pagoda.v1 import session_pb2_grpc

            session = GatewaySession(session_pb2_grpc.SchedulerStub(channel))
            await session.open("gw")
            prompt_a, prompt_b = random_prompts(VOCAB_SIZE, [12, 9], 11)
            await session.submit("running", prompt_a, greedy(40))
            await session.submit("queued", prompt_b, greedy(40))  # max_num_seqs 1: it waits
            await wait_until(lambda: len(session.output("running")) >= 3)
            proc.proc.send_signal(signal.SIGTERM)
            await wait_until(lambda: ("queued", 0) in session.finished, 5, "the queue dropped")
            assert session.finished[("queued", 0)].reason == common_pb2.FINISH_REASON_ABORT
            await session.submit("late", prompt_b, greedy(4))
            await wait_until(lambda: "late" in session.rejected, 5)
            late = session.rejected["late"]
            assert late.reason == session_pb2.Rejected.DRAINING and late.retry_after_s >= 1
            assert await asyncio.to_thread(_http_status, int(http_port), "/ready") == 503
            await session.wait_finished("running")
            fin = session.finished[("running", 0)]
            assert fin.reason == common_pb2.FINISH_REASON_LENGTH
            assert len(session.output("running")) == 40
            assert await proc.wait(10) == 0
            await wait_until(lambda: session.ended, 5)
            assert session.error is not None
            assert session.error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if w is not None:
            w.kill()
        if not proc.exited:
            proc.proc.kill()
            await proc.wait(10)
    log = "\n".join(proc.lines)
    assert "draining: 1 queued sequences dropped, 1 running" in log, log
    assert "scheduler stopped" in log and "Traceback" not in log, log


def _http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code
