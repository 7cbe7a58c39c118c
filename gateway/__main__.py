"""``python -m gateway``: the gateway alone, with the same flags as ``pagoda gateway``."""

from __future__ import annotations

import argparse
import sys

from gateway.server import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description="The pagoda gateway: OpenAI REST and the public gRPC API.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
