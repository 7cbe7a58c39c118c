"""A GGUF file's metadata read without torch: what the default model's card needs, and
the files that are not GGUF. The config is checked field by field against transformers
in tests/worker_svc/test_gguf.py."""

from __future__ import annotations

import pytest

pytest.importorskip("gguf")

from pagoda.default_model import default_model_path
from pagoda.model_card.gguf_metadata import (
    GGUFError,
    gguf_config,
    gguf_tokenizer_bytes,
    gguf_weight_index,
    is_gguf_file,
    open_gguf,
)
from pagoda.model_card.identity import WEIGHT_SAMPLE_BYTES


@pytest.fixture(scope="module")
def reader():
    """One reader for the module: parsing the 49k-token vocabulary takes seconds."""
    return open_gguf(default_model_path())


def test_the_default_model_config(reader):
    config = gguf_config(reader)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["vocab_size"], config["max_position_embeddings"]) == (49152, 8192)
    assert config["eos_token_id"] == 2
    assert config["tie_word_embeddings"] is True


def test_the_weight_index_and_tokenizer_of_the_default_model(reader):
    index = {entry[0]: entry for entry in gguf_weight_index(reader)}
    assert len(index) == 272
    _, shape, kind, sample = index["token_embd.weight"]
    assert (shape, kind) == ([49152, 576], "Q8_0")  # rows first, as torch has it
    assert len(bytes.fromhex(sample)) == WEIGHT_SAMPLE_BYTES
    tokenizer = gguf_tokenizer_bytes(reader)
    assert tokenizer.startswith(b'{"tokenizer.chat_template":')
    assert tokenizer == gguf_tokenizer_bytes(reader)


def test_files_that_are_not_gguf(tmp_path):
    assert is_gguf_file(default_model_path())
    assert not is_gguf_file(tmp_path)
    assert not is_gguf_file(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        open_gguf(tmp_path / "missing.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    assert not is_gguf_file(fake)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        open_gguf(fake)
