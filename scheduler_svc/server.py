"""``pagoda scheduler``: flags, environment fallbacks, and the process around the service.

``run`` reads the model card, builds the policy's and the shell's settings, runs the
service on a uvloop event loop until SIGTERM or SIGINT, drains, and returns the exit
code (0 after a drain, 1 when a port cannot be bound, 2 for bad settings).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import uvloop
import zmq

from pagoda.flags import Flag, add_flags
from pagoda.model_card.card import ModelCard
from pagoda.secrets import read_secret
from scheduler_svc.config import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    SchedulerConfig,
    default_max_num_batched_tokens,
)
from scheduler_svc.service import SchedulerService
from scheduler_svc.settings import ServiceSettings

log = logging.getLogger("scheduler_svc")

# vLLM V1's default token budget for an API server; never below max_num_seqs.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

MODEL = Flag(
    "--model",
    env="PAGODA_MODEL_CARD",
    required=True,
    help="model card folder (written by `pagoda prepare-model`, or a Hugging Face folder)",
)
ADDRESSES = (
    Flag(
        "--host", default="127.0.0.1", env="PAGODA_SCHEDULER_HOST", help="address of all its ports"
    ),
    Flag(
        "--grpc-port",
        type=int,
        default=50061,
        env="PAGODA_SCHEDULER_GRPC_PORT",
        help="gRPC port for gateway sessions, Stats and health, 0: any free port",
    ),
    Flag(
        "--step-port",
        type=int,
        default=50062,
        env="PAGODA_STEP_PORT",
        help="ZeroMQ port the workers dial, 0: any free port",
    ),
    Flag(
        "--http-port",
        type=int,
        default=8001,
        env="PAGODA_SCHEDULER_HTTP_PORT",
        help="port of /health /ready /metrics, 0: any free port",
    ),
    Flag(
        "--kv-events-port",
        type=int,
        env="PAGODA_KV_EVENTS_PORT",
        help="ZeroMQ PUB port of prefix-cache events for KV-aware routers (docs/prefix-cache.md),"
        " 0: any free port; unset: none published",
    ),
    Flag(
        "--kv-snapshot-port",
        type=int,
        env="PAGODA_KV_SNAPSHOT_PORT",
        help="ZeroMQ ROUTER port answering prefix-cache snapshot requests; unset: "
        "--kv-events-port + 1 (any free port when that is 0)",
    ),
    Flag(
        "--shared-secret",
        help="secret the workers must present, required when --host is beyond loopback; "
        "unset: --shared-secret-file, env PAGODA_SHARED_SECRET or PAGODA_SHARED_SECRET_FILE, "
        "else none",
    ),
    Flag(
        "--shared-secret-file",
        env="PAGODA_SHARED_SECRET_FILE",
        metavar="PATH",
        help="a file holding the shared secret (a mounted Secret)",
    ),
)
SCHEDULING = (
    Flag("--max-model-len", type=int, help="longest sequence in tokens; unset: the model card's"),
    Flag("--block-size", type=int, default=16, help="tokens per KV block"),
    Flag("--max-num-seqs", type=int, default=256, help="most sequences in one step"),
    Flag(
        "--max-num-batched-tokens",
        type=int,
        help=f"token budget of one step; unset: max({DEFAULT_MAX_NUM_BATCHED_TOKENS}, "
        "--max-num-seqs), as vLLM's API server",
    ),
    Flag(
        "--policy",
        default="fcfs",
        choices=["fcfs", "priority"],
        help="queue order; with priority a lower value runs first",
    ),
    Flag(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="turn prefix caching off",
        shown="prefix caching %(default)s",
    ),
    Flag(
        "--seed",
        type=int,
        help="seeds the seeds drawn for requests that carry none; unset: from the OS",
    ),
    # The bounded queue, the default deadline and prefix affinity.
    Flag(
        "--max-waiting-requests",
        type=int,
        default=1024,
        env="PAGODA_MAX_WAITING_REQUESTS",
        help="most sequences waiting in the queue (a request with n samples counts n); "
        "past it a submit is refused at once (429 / RESOURCE_EXHAUSTED); 0: unbounded",
    ),
    Flag(
        "--max-waiting-tokens",
        type=int,
        default=1_048_576,
        env="PAGODA_MAX_WAITING_TOKENS",
        help="most prompt tokens of the waiting sequences; past it a submit is refused at "
        "once; 0: unbounded",
    ),
    Flag(
        "--request-timeout",
        type=float,
        default=0.0,
        env="PAGODA_REQUEST_TIMEOUT",
        help="seconds a request without a deadline of its own may take before it is aborted; "
        "0: no limit",
    ),
    Flag(
        "--affinity-wait-ms",
        type=float,
        default=200.0,
        env="PAGODA_AFFINITY_WAIT_MS",
        help="longest a request waits for a better replica (one that caches more of its "
        "prefix, or as much while running fewer sequences) while another could take it; "
        "0: off",
    ),
)
LIVENESS = (
    Flag("--heartbeat-interval-ms", type=int, default=1000, help="how often workers beat"),
    Flag(
        "--heartbeat-timeout-ms",
        type=int,
        default=5000,
        help="silence after which a replica is dead",
    ),
    Flag(
        "--step-timeout",
        type=float,
        default=60.0,
        help="seconds a step may run before its replica is dead",
    ),
    Flag(
        "--stall-timeout",
        type=float,
        default=30.0,
        help="seconds without a completed step, while work is pending on live replicas, "
        "before gRPC health says NOT_SERVING",
    ),
    Flag(
        "--drain-grace",
        type=float,
        default=30.0,
        env="PAGODA_DRAIN_GRACE",
        help="seconds running requests get to finish after SIGTERM",
    ),
)
LOG_LEVEL = Flag(
    "--log-level",
    default="info",
    env="PAGODA_LOG_LEVEL",
    choices=["debug", "info", "warning", "error"],
    help="",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scheduler's flags, in groups; each with its environment variable, where it has
    one, as the default."""
    add_flags(parser, [MODEL])
    add_flags(parser.add_argument_group("addresses"), ADDRESSES)
    add_flags(parser.add_argument_group("scheduling"), SCHEDULING)
    add_flags(parser.add_argument_group("liveness and shutdown"), LIVENESS)
    add_flags(parser, [LOG_LEVEL])


def build(args: argparse.Namespace) -> tuple[ModelCard, SchedulerConfig, ServiceSettings]:
    """The card and both settings from parsed flags; ValueError/OSError say what is wrong."""
    card = ModelCard.load(args.model)
    max_len = args.max_model_len or card.max_model_len
    if max_len > card.max_model_len:
        raise ValueError(
            f"--max-model-len {max_len} exceeds the model's maximum of {card.max_model_len}"
        )
    batched = args.max_num_batched_tokens or default_max_num_batched_tokens(args.max_num_seqs)
    config = SchedulerConfig(
        max_model_len=max_len,
        block_size=args.block_size,
        max_num_batched_tokens=batched,
        max_num_seqs=args.max_num_seqs,
        eos_token_ids=card.eos_token_ids,
        vocab_size=card.vocab_size,
        policy=args.policy,
        enable_prefix_caching=args.prefix_caching,
        seed=args.seed,
        max_waiting_requests=args.max_waiting_requests or None,
        max_waiting_tokens=args.max_waiting_tokens or None,
        affinity_wait_s=args.affinity_wait_ms / 1000,
    )
    settings = ServiceSettings(
        host=args.host,
        grpc_port=args.grpc_port,
        step_port=args.step_port,
        http_port=args.http_port,
        shared_secret=_shared_secret(args),
        heartbeat_interval_ms=args.heartbeat_interval_ms,
        heartbeat_timeout_ms=args.heartbeat_timeout_ms,
        step_timeout_s=args.step_timeout,
        stall_timeout_s=args.stall_timeout,
        drain_grace_s=args.drain_grace,
        request_timeout_s=args.request_timeout,
        kv_events_port=args.kv_events_port,
        kv_snapshot_port=args.kv_snapshot_port,
    )
    return card, config, settings


def _shared_secret(args: argparse.Namespace) -> str:
    return read_secret(args.shared_secret, args.shared_secret_file, "PAGODA_SHARED_SECRET")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, drain, and return the exit code."""
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    try:
        card, config, settings = build(args)
    except (OSError, ValueError) as exc:
        print(f"pagoda scheduler: error: {exc}", file=sys.stderr)
        return 2
    return uvloop.run(_serve(card, config, settings))


async def _serve(card: ModelCard, config: SchedulerConfig, settings: ServiceSettings) -> int:
    service = SchedulerService(card, config, settings)
    try:
        addresses = await service.start()
    except (OSError, RuntimeError, zmq.ZMQError) as exc:
        log.error("cannot listen on %s: %s", settings.host, exc)
        await service.close()
        return 1
    print(addresses.listening_line(), file=sys.stderr, flush=True)
    log.info(
        "serving %s (%s): max_model_len %d, block size %d, %s policy",
        card.name, card.identity[:12], config.max_model_len, config.block_size, config.policy,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    await service.serve()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pagoda scheduler",
        description="The pagoda scheduler service.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
