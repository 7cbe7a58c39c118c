"""A scheduler's step socket under a test's control, and a worker process to point at it.

``ScriptedScheduler`` binds a real ZeroMQ ROUTER (ROUTER_MANDATORY, ROUTER_HANDOVER, as the
scheduler service does). A thread of its own owns the socket (a ZeroMQ socket belongs
to one thread): it answers heartbeats at once unless told to fall silent, records
them, and queues every other message for the test, which scripts the answers.
``WorkerProcess`` runs ``pagoda worker``'s code in a subprocess and collects its log.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import zmq

from pagoda.v1 import step_pb2

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Received:
    identity: str
    msg: step_pb2.WorkerMessage
    at: float  # time.monotonic() on arrival

    @property
    def kind(self) -> str:
        return self.msg.WhichOneof("kind")


class ScriptedScheduler:
    """The scheduler's end of the step protocol, one message at a time."""

    def __init__(self) -> None:
        self._ctx = zmq.Context()
        self.answer_heartbeats = True
        self._inbox: queue.Queue[Received] = queue.Queue()
        self._outbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._lock = threading.Lock()
        self._heartbeats: list[Received] = []
        self.send_errors: list[str] = []
        self._sock = self._router()
        self.port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"127.0.0.1:{self.port}"
        self._start()

    def restart(self) -> None:
        """Close the socket and bind a new one on the same port: a scheduler that restarted
        (every connection drops, and the new one knows no worker)."""
        self._stop_thread()
        self._sock.close()
        self._sock = self._router()
        deadline = time.monotonic() + 5
        while True:  # ZeroMQ closes the old listener in its I/O thread, a moment later
            try:
                self._sock.bind(f"tcp://{self.address}")
                break
            except zmq.ZMQError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.flush()
        self._start()

    def close(self) -> None:
        self._stop_thread()
        self._sock.close()
        self._ctx.term()

    def _router(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # As the scheduler's: a worker's new connection takes its identity over.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.LINGER, 0)
        return sock

    def _start(self) -> None:
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="scripted-scheduler", daemon=True)
        self._thread.start()

    def _stop_thread(self) -> None:
        self._halt.set()
        self._thread.join(timeout=5)

    # -- the test's side ------------------------------------------------------------------

    def send(self, worker_id: str, **kind: object) -> None:
        """Send ``SchedulerMessage(**kind)`` to the worker's main socket."""
        msg = step_pb2.SchedulerMessage(**kind)
        self._outbox.put((f"{worker_id}/main", msg.SerializeToString()))

    def next(self, timeout: float = 10.0) -> Received:
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message from the worker within {timeout}s") from None

    def expect(self, kind: str, timeout: float = 10.0) -> Received:
        got = self.next(timeout)
        assert got.kind == kind, f"expected {kind}, got {got.kind}: {got.msg}"
        return got

    def quiet(self, timeout: float) -> bool:
        """True when no message (heartbeats aside) arrives within ``timeout``."""
        try:
            got = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return True
        self._inbox.put(got)
        return False

    def flush(self) -> list[Received]:
        out = []
        while not self._inbox.empty():
            out.append(self._inbox.get_nowait())
        return out

    def heartbeats(self, since: float = 0.0) -> list[Received]:
        with self._lock:
            return [hb for hb in self._heartbeats if hb.at >= since]

    # -- the socket's thread --------------------------------------------------------------

    def _serve(self) -> None:
        answer = step_pb2.SchedulerMessage(heartbeat=step_pb2.Heartbeat()).SerializeToString()
        while not self._halt.is_set():
            while not self._outbox.empty():
                self._route()
            if not self._sock.poll(10):
                continue
            identity, payload = self._sock.recv_multipart()
            msg = step_pb2.WorkerMessage.FromString(payload)
            got = Received(identity.decode(), msg, time.monotonic())
            if got.kind != "heartbeat":
                self._inbox.put(got)
                continue
            with self._lock:
                self._heartbeats.append(got)
            if self.answer_heartbeats:
                self._sock.send_multipart([identity, answer])

    def _route(self) -> None:
        identity, payload = self._outbox.get_nowait()
        try:
            self._sock.send_multipart([identity.encode(), payload])
        except zmq.ZMQError as exc:  # ROUTER_MANDATORY: no such peer
            self.send_errors.append(f"{identity}: {exc}")


class WorkerProcess:
    """``worker_svc.server.run`` in a subprocess, its stderr collected line by line."""

    def __init__(self, model: Path, scheduler: str, worker_id: str, *extra: str) -> None:
        self.worker_id = worker_id
        code = (
            "import argparse, sys\n"
            "from worker_svc.server import add_arguments, run\n"
            "p = argparse.ArgumentParser(); add_arguments(p)\n"
            "sys.exit(run(p.parse_args(sys.argv[1:])))\n"
        )
        argv = [
            sys.executable, "-c", code, "--model", str(model), "--scheduler", scheduler,
            "--worker-id", worker_id, "--http-port", "0", "--dtype", "float32", *extra,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        match = self.wait_for(rf"worker {re.escape(worker_id)} http=([\d.]+):(\d+)")
        self.http = f"http://{match.group(1)}:{match.group(2)}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("")  # end of the log: wakes waiters
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match[str]:
        """The first log line from index ``start`` on that matches ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                for line in self.lines[i:]:
                    if match := regex.search(line):
                        return match
                i = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and self.lines[-1:] == [""]):
                    raise AssertionError(f"no log line matches {pattern!r}:\n" + self.log())
                self._cond.wait(left)

    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.http + path, timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
