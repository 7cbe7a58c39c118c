"""The ``pagoda`` command: every subcommand's help lists its options with their defaults."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from pagoda.cli import SERVICES, build_parser

COMMANDS = [*SERVICES, "prepare-model"]


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
