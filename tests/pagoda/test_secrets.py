"""Secrets come from a flag, a file or the environment; a named file that fails is an
error, and each service reads its secret through the same rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagoda.secrets import read_secret

ENV = "PAGODA_TEST_SECRET"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ENV, f"{ENV}_FILE"):
        monkeypatch.delenv(name, raising=False)


def secret_file(tmp_path: Path, text: str, name: str = "secret") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_none_given_is_no_secret() -> None:
    assert read_secret(None, None, ENV) == ""


def test_the_order_value_file_env_env_file(tmp_path: Path, monkeypatch) -> None:
    flag_file = secret_file(tmp_path, "from-flag-file\n", "a")
    env_file = secret_file(tmp_path, "from-env-file\n", "b")
    monkeypatch.setenv(f"{ENV}_FILE", env_file)
    assert read_secret(None, None, ENV) == "from-env-file"  # trailing newline dropped
    monkeypatch.setenv(ENV, "from-env")
    assert read_secret(None, None, ENV) == "from-env"
    assert read_secret(None, flag_file, ENV) == "from-flag-file"
    assert read_secret("from-flag", flag_file, ENV) == "from-flag"


@pytest.mark.parametrize("problem", ["missing", "empty", "a folder"])
def test_a_named_file_that_fails_is_an_error_not_an_open_door(tmp_path: Path, problem) -> None:
    path = {
        "missing": str(tmp_path / "nope"),
        "empty": secret_file(tmp_path, "\n"),
        "a folder": str(tmp_path),
    }[problem]
    with pytest.raises(ValueError, match=str(tmp_path)):
        read_secret(None, path, ENV)


def test_each_service_reads_its_secret_file(tmp_path: Path, monkeypatch) -> None:
    """The file flags exist and reach each service's settings (parsed by the real CLI)."""
    from pagoda.entrypoints.cli import build_parser
    from tests.worker_svc.hf_oracle import build_model

    card = build_model("llama", tmp_path)
    path = secret_file(tmp_path, "s3cret\n")
    for name in ("PAGODA_SHARED_SECRET", "PAGODA_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PAGODA_SHARED_SECRET_FILE", path)

    from scheduler_svc import server as scheduler

    args = build_parser("scheduler").parse_args(["scheduler", "--model", str(card)])
    assert scheduler.build(args)[2].shared_secret == "s3cret"

    from worker_svc import server as worker

    args = build_parser("worker").parse_args(["worker"])
    assert worker._settings(args).shared_secret == "s3cret"

    from gateway import server as gateway

    args = build_parser("gateway").parse_args(["gateway", "--model", str(card)])
    assert gateway.Settings.from_args(args).api_key is None
    args = build_parser("gateway").parse_args(
        ["gateway", "--model", str(card), "--api-key-file", path]
    )
    assert gateway.Settings.from_args(args).api_key == "s3cret"
