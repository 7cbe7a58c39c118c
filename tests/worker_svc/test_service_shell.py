"""The worker's shell on its own: flags, thread count, imports, and the step loop around a
deterministic stand-in for the runner (the real runner runs in test_service.py)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from pagoda.v1 import step_pb2
from tests.worker_svc.scripted_scheduler import REPO, ScriptedScheduler
from worker_svc import server
from worker_svc import service as worker_service
from worker_svc.service import WorkerService
from worker_svc.settings import ModelInfo, WorkerSettings, endpoint

StepError = step_pb2.StepError


def test_importing_the_worker_shell_leaves_torch_unloaded() -> None:
    """The thread count must be set before torch loads, so the shell may not import it."""
    code = (
        "import sys, worker_svc.server, worker_svc.service\n"
        "heavy = [m for m in ('torch', 'transformers', 'triton') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize(
    ("text", "size"),
    [("1073741824", 2**30), ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1.5e9),
     ("64 kib", 64 * 1024), ("3g", 3 * 10**9), ("7B", 7)],
)  # fmt: skip
def test_sizes_take_decimal_and_binary_units(text: str, size: float) -> None:
    assert server.parse_bytes(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "2 parsecs", "-1GiB", "1e9"])
def test_sizes_that_are_not_sizes_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        server.parse_bytes(text)


def test_local_workers_divide_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "cpu_cores", lambda: 8)
    monkeypatch.delenv("PAGODA_LOCAL_WORKERS", raising=False)
    assert server.default_threads() == 8
    for local, threads in (("3", 2), ("8", 1), ("16", 1), ("junk", 8)):
        monkeypatch.setenv("PAGODA_LOCAL_WORKERS", local)
        assert server.default_threads() == threads


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "200000 100000\n"}, 2.0),  # cgroup v2: limit 2
        ({"cpu.max": "50000 100000\n"}, 0.5),  # 500m
        ({"cpu.max": "max 100000\n"}, None),  # no limit
        ({"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),  # no cgroup files at all
    ],
)
def test_the_cgroup_cpu_quota_is_read_from_v2_or_v1(tmp_path, files, quota) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert server.cgroup_cpu_quota(tmp_path) == quota


@pytest.mark.parametrize(("quota", "cores"), [(None, 8), (2.0, 2), (2.5, 2), (0.5, 1), (64, 8)])
def test_a_cpu_limit_caps_the_cores(monkeypatch: pytest.MonkeyPatch, quota, cores) -> None:
    """A container limited to 2 CPUs on a 64-core node must not start 64 torch threads."""
    monkeypatch.setattr(server.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(server, "cgroup_cpu_quota", lambda: quota)
    assert server.cpu_cores() == cores


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_fall_back_on_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PAGODA_STEP_ADDR", "PAGODA_WORKER_HTTP_PORT", "PAGODA_SHARED_SECRET",
                 "PAGODA_WORKER_ID", "PAGODA_MODEL", "PAGODA_WORKER_HTTP_HOST",
                 "PAGODA_DRAIN_GRACE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    args = parse()
    assert (args.scheduler, args.http_host, args.http_port) == (
        "127.0.0.1:50062",
        "127.0.0.1",
        8002,
    )
    assert (args.block_size, args.dtype, args.device, args.attention_backend) == (
        16, "auto", "auto", "auto",
    )  # fmt: skip
    for unset in (args.model, args.num_kv_blocks, args.kv_cache_memory, args.max_model_len):
        assert server.given(unset) is None
    assert server._settings(args).shared_secret == "" and args.threads >= 1
    assert not args.compile and not args.cuda_graphs and args.log_level == "INFO"
    assert server._settings(args).drain_grace_s == 30.0
    monkeypatch.setenv("PAGODA_STEP_ADDR", "sched:1234")
    monkeypatch.setenv("PAGODA_WORKER_HTTP_PORT", "0")
    monkeypatch.setenv("PAGODA_SHARED_SECRET", "hush")
    monkeypatch.setenv("PAGODA_WORKER_ID", "pod-7")
    monkeypatch.setenv("PAGODA_MODEL", "/models/m.gguf")
    monkeypatch.setenv("PAGODA_DRAIN_GRACE", "7.5")
    args = parse("--kv-cache-memory", "512MiB", "--log-level", "debug", "--max-model-len", "99")
    settings = server._settings(args)
    assert (settings.scheduler, settings.http_port, settings.shared_secret) == (
        "sched:1234", 0, "hush",
    )  # fmt: skip
    assert (settings.worker_id, args.model) == ("pod-7", "/models/m.gguf")
    assert args.kv_cache_memory == 512 * 2**20 and args.log_level == "DEBUG"
    assert server.given(args.max_model_len) == 99 and settings.drain_grace_s == 7.5
    assert server._settings(parse("--shared-secret", "flag")).shared_secret == "flag"


@pytest.mark.parametrize(
    "formatter", [argparse.HelpFormatter, argparse.ArgumentDefaultsHelpFormatter]
)
def test_help_shows_every_default_once_but_never_the_secret(
    monkeypatch: pytest.MonkeyPatch, formatter: type[argparse.HelpFormatter]
) -> None:
    monkeypatch.setenv("PAGODA_SHARED_SECRET", "hush")
    parser = argparse.ArgumentParser(formatter_class=formatter)
    server.add_arguments(parser)
    assert "hush" not in parser.format_help() and "None" not in parser.format_help()
    shown = parser._get_formatter()
    for action in parser._actions[1:]:
        assert shown._get_help_string(action).count("%(default)s") == 1, action.dest


def test_an_address_becomes_a_zeromq_endpoint() -> None:
    assert endpoint("10.0.0.2:50062") == "tcp://10.0.0.2:50062"
    assert endpoint("ipc:///tmp/step") == "ipc:///tmp/step"


# -- the loop around a stand-in runner --------------------------------------------------


@dataclass
class StandInRunner:
    """Samples token 7 for every new sequence; raises on the steps listed in ``fail_on``."""

    fail_on: set[int] = field(default_factory=set)
    seqs: dict[int, None] = field(default_factory=dict)
    resets: list[tuple[int, int]] = field(default_factory=list)

    def execute(self, plan: step_pb2.StepPlan) -> step_pb2.StepResult:
        if plan.step in self.fail_on:
            raise RuntimeError(f"boom at step {plan.step}")
        result = step_pb2.StepResult(replica_id=plan.replica_id, epoch=plan.epoch, step=plan.step)
        for new in plan.new_sequences:
            self.seqs[new.seq] = None
            result.seqs.append(new.seq)
            result.token_ids.append(7)
        result.compute_seconds = 0.001
        return result

    def reset(self, replica_id: int, epoch: int) -> None:
        self.resets.append((replica_id, epoch))
        self.seqs.clear()

    def warm_up(self) -> int:
        return 0


INFO = ModelInfo(
    identity="abc", vocab_size=100, eos_token_ids=(2,), max_model_len=64, num_kv_blocks=8,
    block_size=16, dtype="float32", device="cpu",
)  # fmt: skip


@dataclass
class Shell:
    service: WorkerService
    runner: StandInRunner
    sched: ScriptedScheduler
    thread: threading.Thread
    codes: list[int]

    def get(self, path: str) -> int:
        port = self.service._probes.port if self.service._probes else 0
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
                return answer.status
        except urllib.error.HTTPError as err:
            return err.code


@pytest.fixture
def shell(request: pytest.FixtureRequest) -> Iterator[Shell]:
    sched = ScriptedScheduler()
    grace = getattr(request, "param", 30.0)
    settings = WorkerSettings(
        scheduler=sched.address, worker_id="unit", http_port=0, drain_grace_s=grace
    )
    service = WorkerService(settings)
    service.start_probes()
    runner = StandInRunner(fail_on={2})
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(service.serve(runner, INFO)))
    thread.start()
    try:
        yield Shell(service, runner, sched, thread, codes)
    finally:
        service.stop()
        service.stop()  # a second stop: no drain to wait for
        thread.join(10)
        sched.close()


def test_an_exception_in_a_step_becomes_an_error_result_and_serving_goes_on(shell: Shell) -> None:
    sched = shell.sched
    assert sched.expect("hello").msg.hello.model_identity == "abc"
    assert shell.get("/ready") == 503 and shell.get("/health") == 200
    sched.send("unit", welcome=step_pb2.Welcome(replica_id=4, epoch=2))
    plan = step_pb2.StepPlan(replica_id=4, epoch=2, step=1)
    plan.new_sequences.add(seq=1)
    sched.send("unit", plan=plan)
    assert list(sched.expect("result").msg.result.token_ids) == [7]
    assert shell.runner.resets == [(4, 2)] and shell.get("/ready") == 200
    sched.send("unit", plan=step_pb2.StepPlan(replica_id=4, epoch=2, step=2))
    failed = sched.expect("result").msg.result
    assert failed.error.kind == StepError.EXECUTION_FAILED
    assert failed.error.detail == "RuntimeError: boom at step 2" and failed.step == 2
    plan = step_pb2.StepPlan(replica_id=4, epoch=2, step=3)
    plan.new_sequences.add(seq=2)
    sched.send("unit", plan=plan)
    assert list(sched.expect("result").msg.result.seqs) == [2]
    assert shell.get("/health") == 200

    shell.service.stop()
    drain = sched.expect("drain").msg.drain
    assert (drain.worker_id, drain.grace_ms) == ("unit", 30_000)
    plan = step_pb2.StepPlan(replica_id=4, epoch=2, step=4)
    plan.new_sequences.add(seq=3)
    sched.send("unit", plan=plan)  # draining, it still runs plans
    assert list(sched.expect("result").msg.result.seqs) == [3]
    assert shell.get("/ready") == 503 and shell.thread.is_alive()
    sched.send("unit", reset=step_pb2.Reset(reason="drained"))
    shell.thread.join(10)
    assert shell.codes == [0]


@pytest.mark.parametrize("shell", [0.3], indirect=True)
def test_a_draining_worker_leaves_by_itself_when_no_release_comes(
    shell: Shell, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_service, "DRAIN_MARGIN_S", 0.2)
    sched = shell.sched
    sched.expect("hello")
    sched.send("unit", welcome=step_pb2.Welcome(replica_id=1, epoch=1))
    deadline = time.monotonic() + 5
    while shell.get("/ready") != 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stopped = time.monotonic()
    shell.service.stop()
    assert sched.expect("drain").msg.drain.grace_ms == 300
    shell.thread.join(10)
    assert shell.codes == [0] and 0.4 < time.monotonic() - stopped < 3


def test_a_worker_without_a_replica_leaves_at_once(shell: Shell) -> None:
    shell.sched.expect("hello")
    stopped = time.monotonic()
    shell.service.stop()
    assert shell.sched.expect("drain").msg.drain.grace_ms == 0
    shell.thread.join(10)
    assert shell.codes == [0] and time.monotonic() - stopped < 2


def test_a_reset_says_hello_again_and_a_stray_message_is_ignored(shell: Shell) -> None:
    sched = shell.sched
    sched.expect("hello")
    sched.send("unit", welcome=step_pb2.Welcome(replica_id=1, epoch=1))
    sched.send("unit", heartbeat=step_pb2.Heartbeat())  # belongs to the heartbeat socket
    sched.send("unit", reset=step_pb2.Reset(reason="because"))
    assert sched.expect("hello").msg.hello.worker_id == "unit"
    assert shell.runner.resets == [(1, 1), (0, 0)] and shell.get("/ready") == 503
    assert sched.quiet(0.2)


def test_a_stale_reset_leaves_the_new_replica_alone(shell: Shell) -> None:
    """A Reset naming a replica the worker no longer holds (sent for its old replica
    before it registered again) must not end the new one."""
    sched = shell.sched
    sched.expect("hello")
    sched.send("unit", welcome=step_pb2.Welcome(replica_id=5, epoch=3))
    sched.send("unit", reset=step_pb2.Reset(reason="old", replica_id=4, epoch=2))
    sched.send("unit", reset=step_pb2.Reset(reason="old epoch", replica_id=5, epoch=2))
    assert sched.quiet(0.3)
    assert shell.runner.resets == [(5, 3)] and shell.get("/ready") == 200
    sched.send("unit", reset=step_pb2.Reset(reason="yours", replica_id=5, epoch=3))
    sched.expect("hello")
    assert shell.runner.resets == [(5, 3), (0, 0)] and shell.get("/ready") == 503


def test_heartbeat_silence_says_hello_only_while_registered(shell: Shell) -> None:
    """Silence while a Hello is already out adds no second one (it goes again by itself
    when unanswered); silence while registered says Hello at once."""
    sched, heartbeat = shell.sched, shell.service._heartbeat
    sched.expect("hello")
    assert heartbeat is not None
    heartbeat.silence.set()
    assert sched.quiet(1.0)  # the unanswered Hello goes again only after 2 s
    sched.send("unit", welcome=step_pb2.Welcome(replica_id=1, epoch=1))
    deadline = time.monotonic() + 5
    while shell.get("/ready") != 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    heartbeat.silence.set()
    sched.expect("hello", timeout=1.0)
    assert shell.runner.resets == [(1, 1), (0, 0)]
