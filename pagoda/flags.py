"""Command-line flags declared once: the flag, its environment variable, default and help.

Each service lists its flags as ``Flag`` values beside its ``run``. ``add_flags`` puts
them on an argparse parser with the environment variable, where one is set, as the
default (a pod is configured by its environment, a shell by flags), and words every
help line alike: what the flag does, its variable, its default. ``to_argv`` goes the
other way, from parsed values to a child's command line: ``pagoda serve`` passes its
flags on to the services it starts through the declarations that parsed them.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any


class Unset:
    """A default decided at run time; its text says by what, in ``--help``.

    Not a ``str``: argparse would run a string default through the flag's ``type``.
    """

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


def given(value: Any) -> Any:
    """A flag's value, or None where it was left to its run-time default."""
    return None if isinstance(value, Unset) else value


def host_and_pid() -> str:
    """``HOST-PID``: a process's name in logs when its deployment gives it none."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Flag:
    """One command-line flag.

    ``default`` may be a function, called when the parser is built (it reads the host
    or the machine). ``env`` names the variable whose value, when set and not empty,
    replaces the default; argparse runs it through ``type`` as if it had been typed, so
    a bad one is a usage error. ``shown`` words the default in ``--help``
    (``%(default)s`` is its value). A ``required`` flag may be left out when ``env`` is
    set. A switch (``action`` "store_true" or "store_false") is off unless given, and
    takes no default, type or variable.
    """

    name: str
    help: str
    default: Any = None
    env: str | None = None
    type: Callable[[str], Any] | None = None
    choices: Sequence[str] | None = None
    action: str | None = None
    metavar: str | None = None
    dest: str | None = None
    required: bool = False
    shown: str = "%(default)s"

    @property
    def key(self) -> str:
        """The flag's attribute in the parsed namespace."""
        return self.dest or self.name.removeprefix("--").replace("-", "_")

    def current_default(self) -> Any:
        """The environment's value, else the declared default."""
        value = os.environ.get(self.env) if self.env else None
        if value:
            return value
        return self.default() if callable(self.default) else self.default

    def help_text(self) -> str:
        """The help line, worded alike in every service: what; env VAR (default: ...)."""
        parts = (self.help, self.env and f"env {self.env}")
        said = "; ".join(part for part in parts if part)
        return f"{said} (default: {self.shown})".lstrip()


Container = argparse.ArgumentParser | argparse._ArgumentGroup


def add_flags(parser: Container, flags: Iterable[Flag]) -> None:
    """Add ``flags`` to ``parser`` (or to one of its groups), defaults read now."""
    for flag in flags:
        options: dict[str, Any] = {"dest": flag.key, "help": flag.help_text()}
        if flag.action is not None:
            options["action"] = flag.action
        else:
            default = flag.current_default()
            options.update(
                default=default,
                type=flag.type,
                choices=flag.choices,
                metavar=flag.metavar,
                required=flag.required and default is None,
            )
        parser.add_argument(flag.name, **options)


def to_argv(flags: Iterable[Flag], args: argparse.Namespace) -> list[str]:
    """``flags`` as ``args`` holds them, as a command line for a child that takes them.

    A flag without a value (None, or an ``Unset`` default) and a switch left off are
    left out, so the child falls back on its own default.
    """
    argv: list[str] = []
    for flag in flags:
        value = given(getattr(args, flag.key))
        if flag.action is not None:
            if value is (flag.action == "store_true"):
                argv.append(flag.name)
        elif value is not None:
            argv += [flag.name, str(value)]
    return argv
