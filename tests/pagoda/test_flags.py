"""Flags declared once: the environment as the default, one wording of every help line,
and parsed values back into a command line, as ``pagoda serve`` hands them to its
children."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from pagoda.entrypoints import serve
from pagoda.entrypoints.cli import build_parser
from pagoda.flags import Flag, Unset, add_flags, given, to_argv

ENV = "PAGODA_TEST_FLAG"

FLAGS = (
    Flag("--port", type=int, default=8000, env=ENV, help="a port"),
    Flag("--name", default=lambda: "computed", help="a name"),
    Flag("--size", type=int, default=Unset("decided later"), help="a size"),
    Flag("--level", default="info", choices=["info", "debug"], help=""),
    Flag("--fast", action="store_true", help="go fast"),
    Flag("--no-cache", dest="cache", action="store_false", help="no cache", shown="on %(default)s"),
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)


def parser(flags=FLAGS, formatter=argparse.HelpFormatter) -> argparse.ArgumentParser:
    out = argparse.ArgumentParser(formatter_class=formatter)
    add_flags(out, flags)
    return out


def test_the_environment_gives_the_default_through_the_type(monkeypatch):
    args = parser().parse_args([])
    assert (args.port, args.name, args.level, args.fast, args.cache) == (
        8000, "computed", "info", False, True,
    )  # fmt: skip
    assert given(args.size) is None
    monkeypatch.setenv(ENV, "9000")
    assert parser().parse_args([]).port == 9000
    assert parser().parse_args(["--port", "1"]).port == 1, "a flag wins over the environment"
    monkeypatch.setenv(ENV, "")
    assert parser().parse_args([]).port == 8000, "an empty variable is no value"
    monkeypatch.setenv(ENV, "many")
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        parser().parse_args([])


def test_a_required_flag_may_come_from_the_environment(monkeypatch):
    flags = [Flag("--model", env=ENV, required=True, help="the model")]
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        parser(flags).parse_args([])
    monkeypatch.setenv(ENV, "/models/m")
    assert parser(flags).parse_args([]).model == "/models/m"


@pytest.mark.parametrize(
    "formatter", [argparse.HelpFormatter, argparse.ArgumentDefaultsHelpFormatter]
)
def test_every_help_line_says_what_then_the_variable_then_the_default_once(formatter):
    shown = parser(formatter=formatter)._get_formatter()
    helps = {a.dest: shown._get_help_string(a) for a in parser(formatter=formatter)._actions[1:]}
    assert helps["port"] == f"a port; env {ENV} (default: %(default)s)"
    assert helps["level"] == "(default: %(default)s)"
    assert helps["cache"] == "no cache (default: on %(default)s)"
    assert all(h.count("%(default)s") == 1 for h in helps.values())


def test_parsed_values_go_back_to_a_command_line_that_parses_the_same():
    argv = ["--port", "0", "--size", "3", "--fast", "--no-cache"]
    args = parser().parse_args(argv)
    assert to_argv(FLAGS, args) == [
        "--port", "0", "--name", "computed", "--size", "3", "--level", "info", "--fast",
        "--no-cache",
    ]  # fmt: skip
    assert vars(parser().parse_args(to_argv(FLAGS, args))) == vars(args)
    defaults = to_argv(FLAGS, parser().parse_args([]))
    assert "--size" not in defaults and "--fast" not in defaults and "--no-cache" not in defaults


def child_parser(command: str) -> argparse.ArgumentParser:
    top = build_parser(command)
    action = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


@pytest.mark.parametrize("child", sorted(serve.FORWARDED))
def test_serve_forwards_flags_it_has_to_a_child_that_takes_them(child):
    assert set(serve.FORWARDED[child]) <= {f.name for f in serve.FLAGS}
    options = {o for a in child_parser(child)._actions for o in a.option_strings}
    assert set(serve.FORWARDED[child]) <= options
    everything = [
        "--max-model-len", "512", "--max-num-batched-tokens", "4096", "--seed", "7",
        "--kv-cache-memory", "2GiB", "--served-model-name", "m", "--port", "0",
    ]  # fmt: skip
    for argv in ([], everything):
        forwarded = serve.forwarded(child, child_parser("serve").parse_args(argv))
        pairs = dict(zip(forwarded[::2], forwarded[1::2], strict=True))
        kept = {f.name for f in serve.FLAGS if f.default is not None or f.name in argv}
        assert set(pairs) == kept & set(serve.FORWARDED[child]), "None is left out"
        assert all(pairs[n] == argv[argv.index(n) + 1] for n in pairs if n in argv)
        child_parser(child).parse_args([*forwarded, "--model", "/m"])
