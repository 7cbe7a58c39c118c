"""The ``pagoda`` command."""

from __future__ import annotations

import argparse

import pagoda


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagoda",
        description="LLM serving split into a gateway, a scheduler and workers.",
    )
    parser.add_argument("--version", action="version", version=f"pagoda {pagoda.__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return args.func(args)
