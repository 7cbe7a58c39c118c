"""The ``pagoda`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pagoda


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagoda",
        description="LLM serving split into a gateway, a scheduler and workers.",
    )
    parser.add_argument("--version", action="version", version=f"pagoda {pagoda.__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    prepare = commands.add_parser(
        "prepare-model",
        help="write the model card (tokenizer, chat template, model.json) of a model",
        description=(
            "Write the model card of MODEL into OUT: what the gateway and the scheduler "
            "read instead of the weights. Needs a full install (the worker extra)."
        ),
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return args.func(args)


def _prepare_model(args: argparse.Namespace) -> int:
    # The worker side (transformers, gguf, torch) loads only when this command runs, so
    # `pagoda` itself stays importable in the torch-free gateway and scheduler installs.
    from pagoda.default_model import default_model_path
    from pagoda.model_card import ModelCardError

    try:
        from worker_svc.model_card_writer import prepare_model_card

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
