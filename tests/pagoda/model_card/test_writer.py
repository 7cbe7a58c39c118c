"""Model cards written from a GGUF file (the default model) and from a Hugging Face
folder, checked against what transformers reports for the same model; the identity a
worker computes; the card cache; ``pagoda prepare-model``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from pagoda.default_model import default_model_path  # noqa: E402
from pagoda.model_card import writer  # noqa: E402
from pagoda.model_card.card import ModelCard  # noqa: E402
from pagoda.model_card.errors import ModelCardError  # noqa: E402
from pagoda.model_card.writer import (  # noqa: E402
    card_name,
    ensure_model_card,
    identity_of,
    prepare_model_card,
)

REPO = Path(__file__).resolve().parents[3]
PAGODA = Path(sys.executable).parent / "pagoda"
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXTS = [
    "Hello, world!",
    "In 2024 there were 366 days; 3.14159 is pi, 1000000 is a million.",
    "  two leading spaces\nand a newline\tand a tab  ",
    "naïve café, 日本語, emoji 🙂",
    "<|im_start|>user\nHi there<|im_end|>\n",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 12 * 34?"},
]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


# --- fixtures (each built once per module) ---------------------------------------------


@pytest.fixture(scope="module")
def default_gguf() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cards")


@pytest.fixture(scope="module")
def default_card(default_gguf, cache) -> ModelCard:
    return ensure_model_card(default_gguf, cache_dir=cache)


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(default_gguf):
    return transformers.AutoTokenizer.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name
    )


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20 + TEXTS, trainer)
    return tok


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    """A Hugging Face folder as save_pretrained writes it: a random 2-layer Llama, a BPE
    tokenizer built with `tokenizers`, a ChatML template, two EOS ids in
    generation_config.json (config.json says one)."""
    import torch

    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tok = build_tokenizer()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(str(folder))
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    generation = json.loads((folder / "generation_config.json").read_text())
    generation["eos_token_id"] = [2, 4]
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


# --- the default model's card -----------------------------------------------------------


def test_default_card_says_what_transformers_says(default_card, hf_gguf_tokenizer, cache):
    card = default_card
    assert card.name == "SmolLM2-135M-Instruct"
    assert card.path == cache / f"SmolLM2-135M-Instruct-{card.identity[:12]}"
    assert card.architecture == "LlamaForCausalLM"
    assert card.vocab_size == 49152 == len(hf_gguf_tokenizer)
    assert card.eos_token_ids == (hf_gguf_tokenizer.eos_token_id,) == (2,)
    assert card.max_model_len == 8192
    assert card.config["num_hidden_layers"] == 30
    assert card.source == str(default_model_path())
    info = card.to_proto()
    assert (info.name, info.identity, info.vocab_size) == (card.name, card.identity, 49152)
    assert list(info.eos_token_ids) == [2] and info.max_model_len == 8192


def test_default_card_has_the_chatml_template(default_card, hf_gguf_tokenizer):
    template = default_card.chat_template()
    assert template == hf_gguf_tokenizer.chat_template
    assert "<|im_start|>" in template and "<|im_end|>" in template
    assert (default_card.path / "chat_template.jinja").is_file()


def test_default_card_tokenizer_encodes_like_transformers(default_card, hf_gguf_tokenizer):
    tok = Tokenizer.from_file(str(default_card.tokenizer_file))
    prompt = hf_gguf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    for text in TEXTS + [prompt]:
        ids = tok.encode(text).ids
        assert ids == hf_gguf_tokenizer.encode(text), text
        assert tok.encode(text, add_special_tokens=False).ids == hf_gguf_tokenizer.encode(
            text, add_special_tokens=False
        )
        assert tok.decode(ids, skip_special_tokens=False) == hf_gguf_tokenizer.decode(ids)
    # Special tokens are single ids; digits are split one by one.
    assert tok.encode("<|im_start|>").ids == [1]
    assert len(tok.encode("12345").ids) == 5


def test_the_card_is_prepared_once(default_gguf, default_card, cache, monkeypatch):
    stamp = (default_card.path / "model.json").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("prepared again")

    monkeypatch.setattr(writer, "_prepare_gguf", fail)
    again = ensure_model_card(default_gguf, cache_dir=cache)
    assert again == default_card
    assert (default_card.path / "model.json").stat().st_mtime_ns == stamp
    assert [p.name for p in cache.iterdir()] == [default_card.path.name]  # no leftovers


def test_the_default_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGODA_CACHE", str(tmp_path))
    assert writer.default_cache_dir() == tmp_path / "cards"
    monkeypatch.delenv("PAGODA_CACHE")
    assert writer.default_cache_dir() == Path.home() / ".cache" / "pagoda" / "cards"


def test_identity_is_the_same_in_another_process_without_torch(default_card, default_gguf, tiny_hf):
    code = (
        "import sys\n"
        "from pagoda.model_card.card import ModelCard\n"
        "from pagoda.model_card.writer import identity_of\n"
        "print(identity_of(sys.argv[1]))\n"
        "print(ModelCard.load(sys.argv[2]).identity)\n"
        # A GGUF file's metadata and identity are read without torch.
        "heavy = [m for m in ('torch', 'transformers', 'worker_svc') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(default_gguf), str(tiny_hf)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [default_card.identity, identity_of(tiny_hf)]


# --- Hugging Face folders ---------------------------------------------------------------


def test_a_hugging_face_folder_is_its_own_card(tiny_hf):
    card = ensure_model_card(tiny_hf)
    assert card.path == card.tokenizer_dir == tiny_hf
    assert card.name == "tiny-llama"
    assert card.architecture == "LlamaForCausalLM"
    assert card.vocab_size == 300
    assert card.eos_token_ids == (2, 4)  # generation_config.json wins over config.json
    assert card.max_model_len == 256
    assert card.identity == identity_of(tiny_hf)
    assert card.chat_template() == CHATML


def test_prepared_card_of_a_hugging_face_folder(tiny_hf, tmp_path):
    out = tmp_path / "card"
    card = prepare_model_card(tiny_hf, out, name="tiny")
    own = ModelCard.load(tiny_hf)
    assert card.path == out and card.name == "tiny"
    for field in ("identity", "architecture", "vocab_size", "eos_token_ids", "max_model_len"):
        assert getattr(card, field) == getattr(own, field), field
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja",
        "generation_config.json",
        "model.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert (out / "tokenizer.json").read_bytes() == (tiny_hf / "tokenizer.json").read_bytes()
    assert ModelCard.load(out) == card
    with pytest.raises(ModelCardError, match="another OUT"):
        prepare_model_card(tiny_hf, tiny_hf)


def test_a_folder_without_tokenizer_json_gets_one_converted_and_cached(tiny_hf, tmp_path):
    folder = copy_of(tiny_hf, tmp_path)
    (folder / "tokenizer.json").unlink()
    build_tokenizer().model.save(str(folder))  # vocab.json + merges.txt: the slow form
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "GPT2Tokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.raises(ModelCardError, match="prepare-model"):
        ModelCard.load(folder)
    cards = tmp_path / "cards"
    card = ensure_model_card(folder, cache_dir=cards)
    assert card.path.parent == cards and (card.path / "tokenizer.json").is_file()
    assert card.identity == identity_of(folder)
    assert card.eos_token_ids == (2, 4)
    converted = Tokenizer.from_file(str(card.tokenizer_file))
    reference = Tokenizer.from_file(str(tiny_hf / "tokenizer.json"))
    for text in TEXTS[:-1]:  # the slow form knows only bos, eos and unk as special
        assert converted.encode(text).ids == reference.encode(text).ids, text
    # A card whose model.json no longer matches the model is prepared again.
    (card.path / "model.json").write_text(
        (card.path / "model.json").read_text().replace(card.identity, "0" * 64)
    )
    assert ensure_model_card(folder, cache_dir=cards).identity == card.identity


def test_identity_changes_with_config_weights_and_tokenizer(tiny_hf, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    base = identity_of(tiny_hf)
    assert identity_of(tiny_hf) == base

    changed = copy_of(tiny_hf, tmp_path / "config")
    config = json.loads((changed / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (changed / "config.json").write_text(json.dumps(config))
    assert identity_of(changed) != base

    changed = copy_of(tiny_hf, tmp_path / "weights")
    tensors = load_file(changed / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] += 1.0
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    assert identity_of(changed) != base
    tensors = {k: v.to(torch.float16) for k, v in tensors.items()}
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    assert identity_of(changed) != base

    changed = copy_of(tiny_hf, tmp_path / "tokenizer")
    tok = json.loads((changed / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<unknown>"
    (changed / "tokenizer.json").write_text(json.dumps(tok))
    assert identity_of(changed) != base

    # Provenance only: the model is the same.
    same = copy_of(tiny_hf, tmp_path / "same")
    config = json.loads((same / "config.json").read_text())
    config["transformers_version"] = "0.0.1"
    (same / "config.json").write_text(json.dumps(config, indent=7))
    assert identity_of(same) == base


def test_identity_errors(tmp_path, default_card):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        identity_of(tmp_path / "nothing")
    with pytest.raises(ModelCardError, match="holds no weights"):
        identity_of(default_card.path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelCardError, match="neither a Hugging Face folder"):
        identity_of(tmp_path / "empty")


def test_card_names(tiny_hf):
    assert card_name(default_model_path()) == "SmolLM2-135M-Instruct"
    assert card_name("/m/llama-3-8b-instruct-q4_k_m.gguf") == "llama-3-8b-instruct"
    assert card_name("/m/Model.F16.gguf") == "Model"
    assert card_name("/m/Model.gguf") == "Model"
    assert card_name(tiny_hf) == "tiny-llama"


# --- the command ------------------------------------------------------------------------


def test_prepare_model_command(tiny_hf, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [str(PAGODA), "prepare-model", str(tiny_hf), str(out), "--name", "tiny"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    card = ModelCard.load(out)
    assert card.name == "tiny"
    assert card.identity == identity_of(tiny_hf)
    assert card.identity in run.stdout


def test_prepare_model_command_errors(tmp_path):
    run = subprocess.run(
        [str(PAGODA), "prepare-model", str(tmp_path / "missing"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
    )
    assert run.returncode == 1
    assert "pagoda prepare-model: error:" in run.stderr and "does not exist" in run.stderr
    assert "Traceback" not in run.stderr
