"""Real stacks for end-to-end tests: ``pagoda serve`` and the services one by one.

Everything here starts real processes with the real ``pagoda`` command on loopback,
on ports the processes choose themselves (port 0), and reads the addresses they log.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pagoda.announcements import GATEWAY_LISTENING, SCHEDULER_LISTENING
from tests.worker_svc.hf_oracle import VOCAB_SIZE, build_model, build_tokenizer

REPO = Path(__file__).resolve().parents[2]
# A plain template over the tiny model's own vocabulary, so that the gateway (through
# the card) and the offline LLM (through the folder) render chats the same way.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_model(root: Path) -> Path:
    """The tiny random Llama of the HF-equality tests, with a chat template."""
    path = build_model("llama", root)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


def slow_model(root: Path) -> Path:
    """A Llama big enough that 60 requests of 2,000 tokens take many seconds on 2 cores.

    Its output is never compared (random weights at transformers' default scale); it
    only has to keep requests running long enough for a test to walk away from them.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = root / "slow-llama"
    if (path / "config.json").exists():
        return path
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    build_tokenizer(VOCAB_SIZE).save_pretrained(path)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


# Every process started here, so that the session can kill whatever a failed test left.
LIVE: list[Process] = []


class Process:
    """A child ``pagoda`` process whose stderr is kept and searched for log lines.

    ``launcher`` runs it: by default this interpreter; another virtual environment's
    python, or ``ip netns exec NS python`` to run it on another host. With
    ``console_script``, the installed ``pagoda`` command runs it instead, as a user
    would. It runs in ``cwd``, the repository by default.
    """

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, name: str = "",
                 launcher: list[str] | None = None, console_script: bool = False,
                 cwd: Path = REPO):  # fmt: skip
        self.name = name or argv[0]
        self.lines: list[str] = []
        self._cond = threading.Condition()
        if console_script:
            command = [str(Path(sys.executable).with_name("pagoda"))]
        else:
            command = [*(launcher or [sys.executable]), "-m", "pagoda"]
        self.proc = subprocess.Popen(
            [*command, *argv],
            cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()
        LIVE.append(self)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 180.0) -> re.Match:
        """The first log line matching ``pattern``; fails if the process exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                if self.proc.poll() is not None and seen == len(self.lines):
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.log}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name}: no line matching {pattern!r}:\n{self.log}")
                self._cond.wait(min(left, 0.5))

    @property
    def log(self) -> str:
        return "".join(self.lines[-60:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"{self.name} did not stop on signal {sig}:\n{self.log}") from None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


class Serve(Process):
    """``pagoda serve`` with the gateway on free ports; addresses read from its banner."""

    def __init__(self, model: Path | None, workers: int = 1, extra: list[str] | None = None,
                 env: dict[str, str] | None = None, console_script: bool = False,
                 cwd: Path = REPO):  # fmt: skip
        argv = ["serve", "--workers", str(workers), "--port", "0", "--grpc-port", "0"]
        argv += ["--model", str(model)] if model else []
        super().__init__(argv + (extra or []), env, name="pagoda serve",
                         console_script=console_script, cwd=cwd)  # fmt: skip
        http = self.wait_for(r"OpenAI REST: (http://\S+)/v1", timeout=600).group(1)
        self.base_url = http
        self.grpc_addr = self.wait_for(r"gRPC:\s+(\S+)").group(1)
        self.scheduler_http = self.wait_for(r"\[scheduler\].*http=(\S+)").group(1)


def pagoda_processes(marker: str) -> list[int]:
    """Pids of live ``pagoda`` processes whose command line mentions ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "pagoda" in cmd and marker in cmd and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scheduler(Process):
    """``pagoda scheduler`` on the given gRPC port (0: any), the rest on free ports."""

    def __init__(self, card: Path, grpc_port: int = 0, extra: list[str] | None = None,
                 env: dict[str, str] | None = None, launcher: list[str] | None = None):  # fmt: skip
        argv = ["scheduler", "--model", str(card), "--grpc-port", str(grpc_port),
                "--step-port", "0", "--http-port", "0", *(extra or [])]  # fmt: skip
        super().__init__(argv, env, name="scheduler", launcher=launcher)
        match = self.wait_for(SCHEDULER_LISTENING.pattern)
        self.grpc_addr, self.step_addr, self.http_addr = match.groups()

    def stats(self):
        from pagoda.v1 import session_pb2, session_pb2_grpc

        with grpc_channel(self.grpc_addr) as channel:
            stub = session_pb2_grpc.SchedulerStub(channel)
            return stub.Stats(session_pb2.StatsRequest(), timeout=10)


class Worker(Process):
    """``pagoda worker`` dialing ``step_addr``; waits until it has registered."""

    def __init__(self, model: Path, step_addr: str, worker_id: str,
                 extra: list[str] | None = None, env: dict[str, str] | None = None,
                 launcher: list[str] | None = None):  # fmt: skip
        argv = ["worker", "--scheduler", step_addr, "--model", str(model), "--worker-id",
                worker_id, "--http-port", "0", "--dtype", "float32", *(extra or [])]  # fmt: skip
        super().__init__(argv, env, name=worker_id, launcher=launcher)
        self.wait_for(rf"worker {re.escape(worker_id)} registered replica=")


class Gateway(Process):
    """``pagoda gateway`` on free ports, talking to ``scheduler_addr``."""

    def __init__(self, card: Path, scheduler_addr: str, extra: list[str] | None = None,
                 env: dict[str, str] | None = None, ready: bool = True,
                 launcher: list[str] | None = None):  # fmt: skip
        argv = ["gateway", "--model", str(card), "--scheduler", scheduler_addr, "--port", "0",
                "--grpc-port", "0", *(extra or [])]  # fmt: skip
        super().__init__(argv, env, name="gateway", launcher=launcher)
        http, grpc_addr = self.wait_for(GATEWAY_LISTENING.pattern).groups()
        self.base_url = f"http://{http}"
        self.grpc_addr = grpc_addr
        if ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until /ready says the session to the scheduler is open (listening comes first)."""
        import httpx

        deadline = time.monotonic() + timeout
        url = f"{self.base_url}/ready"  # never through a proxy from the environment
        while httpx.get(url, timeout=5, trust_env=False).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway not ready in {timeout} s:\n{self.log}")
            time.sleep(0.1)


def grpc_channel(address: str):
    import grpc

    return grpc.insecure_channel(address)
