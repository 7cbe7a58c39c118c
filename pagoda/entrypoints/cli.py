"""The ``pagoda`` command: each service alone, the whole stack, and model cards.

``pagoda gateway | scheduler | worker`` run one service, configured by flags and
environment variables (docs/services.md); ``pagoda serve`` runs them all on one
machine. A service's flags are defined by that service (``add_arguments`` in its
``server`` module), and only the chosen service's module is imported: the gateway's
process never loads the worker's code, nor torch. ``pagoda health`` probes a running
service's health endpoint (the container images' HEALTHCHECK).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pagoda
from pagoda import lifeline


def _serve() -> ModuleType:
    from pagoda.entrypoints import serve

    return serve


def _gateway() -> ModuleType:
    from gateway import server

    return server


def _scheduler() -> ModuleType:
    from scheduler_svc import server

    return server


def _worker() -> ModuleType:
    from worker_svc import server

    return server


# Subcommand -> (loader of the module with add_arguments/run, one-line help). The
# imports are plain ones inside the loaders, so that the import graph (and so the
# import-linter contracts) sees them, while a process loads only the service it runs.
SERVICES: dict[str, tuple[Callable[[], ModuleType], str]] = {
    "serve": (_serve, "run the gateway, the scheduler and N workers on this machine"),
    "gateway": (_gateway, "run the gateway: OpenAI REST and the public gRPC API"),
    "scheduler": (_scheduler, "run the scheduler: queue, KV blocks, step plans"),
    "worker": (_worker, "run a worker: the model and its KV cache"),
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help line, descriptions kept as written."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s options are built (its module is imported)."""
    parser = argparse.ArgumentParser(
        prog="pagoda",
        description="LLM serving split into a gateway, a scheduler and workers.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"pagoda {pagoda.__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, (load, help_text) in SERVICES.items():
        sub = commands.add_parser(
            name, help=help_text, description=help_text, formatter_class=_Formatter
        )
        if name == command:
            loaded = load()
            loaded.add_arguments(sub)
            sub.set_defaults(func=loaded.run)

    prepare = commands.add_parser(
        "prepare-model",
        help="write the model card (tokenizer, chat template, model.json) of a model",
        description=(
            "Write the model card of MODEL into OUT: what the gateway and the scheduler "
            "read instead of the weights. Needs a full install (the worker extra)."
        ),
        formatter_class=_Formatter,
    )
    prepare.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="a Hugging Face folder or a .gguf file (default: the default model)",
    )
    prepare.add_argument("out", metavar="OUT", type=Path, help="the card folder to write")
    prepare.add_argument("--name", help="the name clients use for the model")
    prepare.set_defaults(func=_prepare_model)

    health = commands.add_parser(
        "health",
        help="probe a service's HTTP health endpoint: exit 0 on HTTP 200, else 1",
        description=(
            "Ask a pagoda service's probe port for PATH and exit 0 when it answers 200, "
            "1 otherwise (with the reason on stderr): the HEALTHCHECK of the container "
            "images, which have no curl. Probe ports: gateway 8000, scheduler 8001, "
            "worker 8002."
        ),
        formatter_class=_Formatter,
    )
    health.add_argument("--host", default="127.0.0.1", help="the service's address")
    health.add_argument("--port", type=int, default=8000, help="the service's HTTP port")
    health.add_argument("--path", default="/health", help="the endpoint (/health or /ready)")
    health.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="longest wait for an answer"
    )
    health.set_defaults(func=_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    # First, before a slow import: a child of `pagoda serve` ends when its parent does.
    lifeline.watch_parent()
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SERVICES else None)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return args.func(args)


def _prepare_model(args: argparse.Namespace) -> int:
    # The worker side (transformers, gguf, torch) loads only when this command runs, so
    # `pagoda` itself stays importable in the torch-free gateway and scheduler installs.
    from pagoda.default_model import default_model_path
    from pagoda.model_card.errors import ModelCardError

    try:
        from pagoda.model_card.writer import prepare_model_card

        model = Path(args.model) if args.model else default_model_path()
        card = prepare_model_card(model, args.out, name=args.name)
    except ImportError as exc:
        return _fail(f"needs a full install (pip install 'pagoda[worker]'): {exc}")
    except (OSError, ModelCardError, ValueError) as exc:
        return _fail(str(exc))
    print(f"wrote the model card of {card.source} to {card.path}")
    print(f"  name:          {card.name}")
    print(f"  identity:      {card.identity}")
    print(f"  architecture:  {card.architecture}")
    print(f"  vocab_size:    {card.vocab_size}")
    print(f"  eos_token_ids: {list(card.eos_token_ids)}")
    print(f"  max_model_len: {card.max_model_len}")
    return 0


def _fail(message: str) -> int:
    print(f"pagoda prepare-model: error: {message}", file=sys.stderr)
    return 1


def _health(args: argparse.Namespace) -> int:
    # Standard library only, and no service module: a probe that runs every few seconds
    # in the service's container must start fast and work in every image.
    import urllib.error
    import urllib.request

    host = f"[{args.host}]" if ":" in args.host else args.host
    path = args.path if args.path.startswith("/") else f"/{args.path}"
    url = f"http://{host}:{args.port}{path}"
    # No proxy: a proxy set for the container's outbound traffic must not see the probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=args.timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
        exc.close()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"pagoda health: {url}: {reason}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"pagoda health: {url} answered HTTP {status}", file=sys.stderr)
        return 1
    return 0
