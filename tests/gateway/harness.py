"""Runs a real gateway process (``python -m gateway``) for the tests, and reads its log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pagoda.announcements import GATEWAY_LISTENING

REPO = Path(__file__).resolve().parents[2]
LISTENING = GATEWAY_LISTENING.pattern


@dataclass
class GatewayProcess:
    """One gateway; ``url`` is its REST base URL, ``grpc_target`` its gRPC address."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    http: str = ""
    grpc_target: str = ""

    @classmethod
    def start(
        cls, card: Path, scheduler: str, *extra: str, timeout: float = 30.0
    ) -> GatewayProcess:
        cmd = [
            sys.executable,
            "-m",
            "gateway",
            "--model",
            str(card),
            "--scheduler",
            scheduler,
            "--port",
            "0",
            "--grpc-port",
            "0",
            "--drain-grace",
            "5",
            *extra,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAGODA_")}
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        gateway = cls(proc)
        threading.Thread(target=gateway._pump, daemon=True).start()
        gateway._wait_listening(timeout)
        return gateway

    @property
    def url(self) -> str:
        return f"http://{self.http}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return "".join(self.lines)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := LISTENING.search(line):
                    self.http, self.grpc_target = match.group(1), match.group(2)
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.proc.kill()
        raise AssertionError(f"the gateway did not start:\n{self.log()}")

    def wait_ready(self, ready: bool = True, timeout: float = 10.0) -> None:
        """Until /ready says ``ready`` (200) or not (503)."""
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            status = httpx.get(f"{self.url}/ready", timeout=2).status_code
            if (status == 200) == ready:
                return
            time.sleep(0.02)
        raise AssertionError(f"/ready stayed {status}:\n{self.log()}")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the gateway did not exit on SIGTERM:\n{self.log()}") from None
