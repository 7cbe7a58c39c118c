"""Hugging Face folders for the card tests, written with numpy and tokenizers only, and a
fresh interpreter to read them in (what it imports is what a service would import)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

safetensors_numpy = pytest.importorskip("safetensors.numpy")

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 8,
    "hidden_size": 4,
    "max_position_embeddings": 128,
    "eos_token_id": 2,
    "transformers_version": "5.0.0",
}
VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "!": 5, "a": 6, "b": 7}


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.embed_tokens.weight": rng.standard_normal((8, 4)).astype(np.float32),
        "model.norm.weight": np.ones(4, np.float16),
    }


def make_folder(
    folder: Path,
    config: dict | None = None,
    *,
    generation: dict | None = None,
    tokenizer: bool = True,
    files: dict[str, str] | None = None,
) -> Path:
    """A Hugging Face folder: config.json, model.safetensors, tokenizer.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or CONFIG))
    safetensors_numpy.save_file(weights(), str(folder / "model.safetensors"))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    if tokenizer:
        tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(folder / "tokenizer.json"))
    for name, text in (files or {}).items():
        (folder / name).write_text(text)
    return folder


def run_python(code: str, *args: str) -> str:
    """The output of ``code`` run by a fresh interpreter with ``args``; fails on an error."""
    run = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    return run.stdout
