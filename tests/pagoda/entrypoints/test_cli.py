"""The ``pagoda`` command: every subcommand's help lists its options with their defaults;
``pagoda health`` against a real HTTP server; the arguments of ``pagoda prepare-model``."""

from __future__ import annotations

import argparse
import http.server
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pagoda.entrypoints.cli import SERVICES, build_parser, main

COMMANDS = [*SERVICES, "prepare-model", "health"]


def subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser(command)
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_is_explained(command):
    sub = subparser(command)
    options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert options or command == "prepare-model"
    for action in options:
        assert action.help, f"pagoda {command} {action.option_strings[0]} has no help"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_runs_and_shows_defaults(command):
    out = subprocess.run(
        [sys.executable, "-m", "pagoda", command, "--help"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"pagoda {command}" in out.stdout
    if command != "prepare-model":
        assert "(default:" in out.stdout


def test_the_command_lists_every_subcommand():
    out = subprocess.run(
        [sys.executable, "-m", "pagoda", "--help"], capture_output=True, text=True, check=True
    )
    for command in COMMANDS:
        assert command in out.stdout


class _Probes(http.server.BaseHTTPRequestHandler):
    """/health answers 200, /ready 503 (a service that is alive but not ready), /slow
    answers after 3 s, anything else 404."""

    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(3)
        status = {"/health": 200, "/ready": 503, "/slow": 200}.get(self.path, 404)
        body = b"{}"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def probe_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Probes)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_health_exits_0_on_200(probe_port, capsys):
    assert main(["health", "--port", str(probe_port)]) == 0
    assert capsys.readouterr().err == ""


def test_health_exits_1_on_503_with_the_status(probe_port, capsys):
    assert main(["health", "--port", str(probe_port), "--path", "/ready"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HTTP 503" in err and f":{probe_port}/ready" in err
    assert main(["health", "--port", str(probe_port), "--path", "missing"]) == 1
    assert "/missing answered HTTP 404" in capsys.readouterr().err


def test_health_exits_1_when_nothing_listens(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the probe: nothing listens there
    assert main(["health", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"127.0.0.1:{port}/health" in err and "refused" in err


def test_health_gives_up_after_its_timeout(probe_port, capsys):
    started = time.monotonic()
    assert main(["health", "--port", str(probe_port), "--path", "/slow", "--timeout", "0.5"]) == 1
    assert time.monotonic() - started < 2.5
    assert "timed out" in capsys.readouterr().err


def test_health_as_a_command_loads_no_service_and_no_torch(probe_port):
    """The images run it every few seconds: it must not pay for a service's imports."""
    script = (
        "import sys\n"
        "from pagoda.entrypoints.cli import main\n"
        f"code = main(['health', '--port', '{probe_port}'])\n"
        "heavy = ('gateway', 'scheduler_svc', 'worker_svc', 'pagoda_kernels', 'torch', 'grpc')\n"
        "print(code, sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "[]"]
    for path, code in (("/health", 0), ("/ready", 1)):
        probe = subprocess.run(
            [sys.executable, "-m", "pagoda", "health", "--port", str(probe_port), "--path", path],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert probe.returncode == code, probe.stderr


def test_prepare_model_arguments():
    parser = build_parser()
    args = parser.parse_args(["prepare-model", "out"])
    assert args.model is None and args.out == Path("out")  # None: the default model
    args = parser.parse_args(["prepare-model", "m.gguf", "out", "--name", "n"])
    assert (args.model, args.out, args.name) == ("m.gguf", Path("out"), "n")
    assert parser.parse_args([]).__dict__.get("func") is None
