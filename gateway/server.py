"""``pagoda gateway``: flags, and the process that serves REST and gRPC in one loop.

``run`` serves uvicorn (the OpenAI REST API) and the grpc.aio server (the public gRPC
API) on one uvloop event loop, beside the task that keeps the scheduler session open.
SIGTERM drains: new requests get 503 / UNAVAILABLE and ``/ready`` turns 503 at once,
open requests and streams get ``--drain-grace`` seconds to finish, then the process
exits 0. Once both ports listen it logs, on one line,
``gateway listening http=HOST:PORT grpc=HOST:PORT`` (with the real ports when 0 asked
for any free one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import uvicorn
import uvloop

from gateway import errors
from gateway.core import Gateway
from gateway.grpc_api import Health, add_services
from gateway.openai_api import HttpSettings, build_app
from gateway.session import SessionClient
from pagoda.announcements import GATEWAY_LISTENING
from pagoda.flags import Flag, add_flags, host_and_pid
from pagoda.model_card.card import ModelCard
from pagoda.model_card.errors import ModelCardError
from pagoda.secrets import read_secret
from pagoda.text import Tokenizer
from pagoda.v1 import session_pb2

log = logging.getLogger("gateway")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


FLAGS = (
    Flag(
        "--model",
        env="PAGODA_MODEL_CARD",
        metavar="CARD",
        help="model card folder (written by `pagoda prepare-model`, or a Hugging Face folder)",
    ),
    Flag(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer folder, when not the card's own (None: the card's own)",
    ),
    Flag(
        "--served-model-name",
        metavar="NAME",
        help="the model name clients send (None: the card's name)",
    ),
    Flag("--host", default="127.0.0.1", env="PAGODA_HOST", help="address to bind"),
    Flag("--port", type=int, default=8000, env="PAGODA_PORT", help="REST port (0: any free port)"),
    Flag(
        "--grpc-port",
        type=int,
        default=50051,
        env="PAGODA_GRPC_PORT",
        help="public gRPC port (0: any free port)",
    ),
    Flag(
        "--scheduler",
        default="127.0.0.1:50061",
        env="PAGODA_SCHEDULER",
        metavar="HOST:PORT",
        help="the scheduler's session address",
    ),
    Flag(
        "--api-key",
        help="API key clients must send as 'Authorization: Bearer KEY' (None: "
        "--api-key-file, env PAGODA_API_KEY or PAGODA_API_KEY_FILE, else no key)",
    ),
    Flag(
        "--api-key-file",
        env="PAGODA_API_KEY_FILE",
        metavar="PATH",
        help="a file holding the API key (a mounted Secret)",
    ),
    Flag(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body accepted; larger ones get 413",
    ),
    Flag(
        "--gateway-id",
        default=host_and_pid,
        env="PAGODA_GATEWAY_ID",
        help="this gateway's name in the scheduler's logs",
    ),
    Flag(
        "--drain-grace",
        type=float,
        default=30.0,
        env="PAGODA_DRAIN_GRACE",
        metavar="SECONDS",
        help="on SIGTERM, how long open requests may take to finish",
    ),
    Flag(
        "--request-timeout",
        type=float,
        default=0.0,
        env="PAGODA_REQUEST_TIMEOUT",
        metavar="SECONDS",
        help="deadline of a request that names none (REST `timeout`, a gRPC deadline), from "
        "its arrival; past it the request is aborted and answered 504 / DEADLINE_EXCEEDED "
        "(0: none)",
    ),
    Flag(
        "--min-ready-replicas",
        type=int,
        default=0,
        env="PAGODA_MIN_READY_REPLICAS",
        metavar="N",
        help="/ready answers 503 until the scheduler reports at least N live worker replicas "
        "(`pagoda serve` passes its --workers); 0: ready with or without workers, so workers "
        "can scale to zero while requests wait in the queue",
    ),
    Flag(
        "--log-level",
        default="info",
        env="PAGODA_LOG_LEVEL",
        choices=["debug", "info", "warning", "error"],
        help="log level",
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The gateway's flags, each with its environment variable as the default."""
    add_flags(parser, FLAGS)


@dataclass(frozen=True)
class Settings:
    """The flags, checked, with the card and tokenizer loaded."""

    card: ModelCard
    tokenizer: Tokenizer
    served_model_name: str
    host: str
    port: int
    grpc_port: int
    scheduler: str
    api_key: str | None
    max_body_bytes: int
    gateway_id: str
    drain_grace_s: float
    request_timeout_s: float | None = None
    min_ready_replicas: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        if not args.model:
            raise ValueError("give the model card: --model CARD or PAGODA_MODEL_CARD")
        card = ModelCard.load(args.model)
        tokenizer = Tokenizer.from_dir(
            Path(args.tokenizer) if args.tokenizer else card.tokenizer_dir
        )
        if args.max_body_bytes <= 0:
            raise ValueError("--max-body-bytes must be positive")
        if not (math.isfinite(args.request_timeout) and args.request_timeout >= 0):
            raise ValueError("--request-timeout must be a finite number of seconds, 0 for none")
        if args.min_ready_replicas < 0:
            raise ValueError("--min-ready-replicas must be 0 or more")
        return cls(
            card=card,
            tokenizer=tokenizer,
            served_model_name=args.served_model_name or card.name,
            host=args.host,
            port=args.port,
            grpc_port=args.grpc_port,
            scheduler=args.scheduler,
            api_key=read_secret(args.api_key, args.api_key_file, "PAGODA_API_KEY") or None,
            max_body_bytes=args.max_body_bytes,
            gateway_id=args.gateway_id,
            drain_grace_s=max(0.0, args.drain_grace),
            request_timeout_s=args.request_timeout or None,
            min_ready_replicas=args.min_ready_replicas,
        )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM / SIGINT; returns the exit code."""
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = Settings.from_args(args)
    except (OSError, ModelCardError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve(settings))


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: the gateway drains on SIGTERM itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve(settings: Settings) -> int:
    core = Gateway(
        settings.card,
        settings.tokenizer,
        settings.served_model_name,
        request_timeout_s=settings.request_timeout_s,
        min_ready_replicas=settings.min_ready_replicas,
    )
    health = Health()
    background: set[asyncio.Task[None]] = set()
    shown = [False]  # the readiness gRPC health last showed

    def show_readiness() -> None:
        ready = core.ready()
        if ready == shown[0]:
            return
        shown[0] = ready
        task = asyncio.get_running_loop().create_task(health.update(ready))
        background.add(task)
        task.add_done_callback(background.discard)

    def on_state(up: bool) -> None:
        core.on_session_state(up)
        show_readiness()

    def on_load(load: session_pb2.SchedulerLoad | None) -> None:
        core.on_load(load)
        show_readiness()

    session = SessionClient(
        settings.scheduler,
        settings.gateway_id,
        on_update=core.table.on_update,
        on_state=on_state,
        on_engine=core.on_engine_state,
        on_load=on_load,
        expected_identity=settings.card.identity,
    )
    core.attach_session(session)
    await health.update(False)

    grpc_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    add_services(grpc_server, core, health)
    try:
        sock = _bind(settings.host, settings.port)
        grpc_port = grpc_server.add_insecure_port(_address(settings.host, settings.grpc_port))
    except (OSError, RuntimeError) as exc:
        log.error("cannot listen: %s", exc)
        return 2
    if grpc_port == 0:
        log.error("cannot listen on gRPC port %s", settings.grpc_port)
        return 2
    await grpc_server.start()
    app = build_app(core, HttpSettings(settings.api_key, settings.max_body_bytes))
    http = _Uvicorn(
        uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
    )
    session_task = asyncio.create_task(session.run(), name="session")
    http_task = asyncio.create_task(http.serve(sockets=[sock]), name="http")
    while not http.started and not http_task.done():
        await asyncio.sleep(0.01)
    if http_task.done():
        log.error("the HTTP server did not start")
        return 2
    # The line launchers parse (pagoda.announcements), unadorned.
    http_address = _address(settings.host, sock.getsockname()[1])
    grpc_address = _address(settings.host, grpc_port)
    line = GATEWAY_LISTENING.line(http=http_address, grpc=grpc_address)
    print(line, file=sys.stderr, flush=True)
    await _until_signalled(http_task)
    await _drain(core, health, settings.drain_grace_s)
    session.close()
    http.should_exit = True
    await grpc_server.stop(grace=1.0)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(http_task, timeout=5)
    session_task.cancel()
    with contextlib.suppress(BaseException):
        await session_task
    log.info("gateway stopped")
    return 0


async def _until_signalled(http_task: asyncio.Task[None]) -> None:
    """Until SIGTERM or SIGINT (or the HTTP server ending by itself)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({stopper, http_task}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()


async def _drain(core: Gateway, health: Health, grace_s: float) -> None:
    """Refuse new requests, then give the open ones ``grace_s`` seconds to finish."""
    core.draining = True
    await health.update(False)
    log.info("draining: %d request(s) open, %.0f s grace", len(core.table), grace_s)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    while len(core.table) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if len(core.table):
        log.warning("drain grace over: ending %d request(s)", len(core.table))
        # Each gets a retryable 503 (a stream: an error event) before the session closes,
        # rather than a connection cut with no word of why.
        core.table.fail_all(errors.draining())


def _bind(host: str, port: int) -> socket.socket:
    """The REST listening socket, bound here so that port 0 can be reported."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
