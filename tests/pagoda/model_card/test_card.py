"""The torch-free model card: Hugging Face folders read with the standard library,
model.json, the errors that say what to do, and the modules that load no torch."""

from __future__ import annotations

import json

import pytest

from pagoda.model_card.card import ModelCard
from pagoda.model_card.errors import ModelCardError
from pagoda.model_card.identity import hf_folder_identity
from tests.pagoda.model_card.folders import CONFIG, make_folder, run_python

# --- Hugging Face folders as cards ------------------------------------------------------


def test_a_hugging_face_folder_is_a_card(tmp_path):
    folder = make_folder(tmp_path / "my-model")
    card = ModelCard.load(folder)
    assert card.path == card.tokenizer_dir == folder
    assert card.tokenizer_file == folder / "tokenizer.json"
    assert (card.name, card.architecture, card.vocab_size) == ("my-model", "LlamaForCausalLM", 8)
    assert card.eos_token_ids == (2,)
    assert card.max_model_len == 128
    assert card.identity == hf_folder_identity(folder)
    assert card.chat_template() is None
    info = card.to_proto()
    assert (info.name, info.identity) == (card.name, card.identity)
    assert info.architecture == card.architecture
    assert (info.vocab_size, list(info.eos_token_ids), info.max_model_len) == (8, [2], 128)


def test_a_hugging_face_cache_snapshot_is_named_after_its_repository(tmp_path):
    snapshot = tmp_path / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "0123abc"
    assert ModelCard.load(make_folder(snapshot)).name == "HuggingFaceTB/SmolLM2-135M"


@pytest.mark.parametrize(
    ("config_eos", "generation", "expected"),
    [
        (2, {"eos_token_id": [5, 2, 5]}, (5, 2)),  # generation_config wins, repeats dropped
        ([2, 7], None, (2, 7)),
        (2, {"eos_token_id": None}, (2,)),
        (None, {}, (2,)),  # tokenizer_config's eos_token, looked up in tokenizer.json
    ],
)
def test_eos_ids(tmp_path, config_eos, generation, expected):
    config = {**CONFIG, "eos_token_id": config_eos}
    files = {"tokenizer_config.json": json.dumps({"eos_token": "</s>"})}
    card = ModelCard.load(make_folder(tmp_path / "m", config, generation=generation, files=files))
    assert card.eos_token_ids == expected


@pytest.mark.parametrize("key", ["n_positions", "max_sequence_length"])
def test_max_model_len_from_other_families(tmp_path, key):
    config = {k: v for k, v in CONFIG.items() if k != "max_position_embeddings"} | {key: 77}
    assert ModelCard.load(make_folder(tmp_path / "m", config)).max_model_len == 77


def test_chat_template_sources(tmp_path):
    def template_of(files):
        folder = make_folder(tmp_path / str(len(list(tmp_path.iterdir()))), files=files)
        return ModelCard.load(folder).chat_template()

    assert template_of({"chat_template.jinja": "J", "tokenizer_config.json": "{}"}) == "J"
    assert template_of({"tokenizer_config.json": json.dumps({"chat_template": "T"})}) == "T"
    assert template_of({"chat_template.json": json.dumps({"chat_template": "C"})}) == "C"
    named = [{"name": "tool_use", "template": "U"}, {"name": "default", "template": "D"}]
    assert template_of({"tokenizer_config.json": json.dumps({"chat_template": named})}) == "D"


# --- model.json -------------------------------------------------------------------------


def test_model_json_round_trip(tmp_path):
    source = ModelCard.load(make_folder(tmp_path / "m", generation={"eos_token_id": [2, 3]}))
    card_dir = tmp_path / "card"
    card_dir.mkdir()
    (card_dir / "tokenizer.json").write_bytes(source.tokenizer_file.read_bytes())
    source.write_model_json(card_dir)
    card = ModelCard.load(card_dir)
    assert card.path == card.tokenizer_dir == card_dir
    for field in ("name", "identity", "architecture", "vocab_size", "eos_token_ids"):
        assert getattr(card, field) == getattr(source, field)
    assert card.max_model_len == 128 and card.eos_token_ids == (2, 3)
    assert card.config == source.config and card.source == source.source
    data = json.loads((card_dir / "model.json").read_text())
    assert data["format"] == 1 and data["eos_token_ids"] == [2, 3]


def test_model_json_errors(tmp_path):
    card_dir = tmp_path / "card"
    card_dir.mkdir()
    (card_dir / "tokenizer.json").write_text("{}")
    good = {
        "format": 1,
        "name": "m",
        "identity": "ab",
        "architecture": "LlamaForCausalLM",
        "vocab_size": 8,
        "eos_token_ids": [2],
        "max_model_len": 16,
    }

    def load(data):
        (card_dir / "model.json").write_text(data if isinstance(data, str) else json.dumps(data))
        return ModelCard.load(card_dir)

    assert load(good).max_model_len == 16
    with pytest.raises(ModelCardError, match="newer pagoda"):
        load({**good, "format": 2})
    with pytest.raises(ModelCardError, match="'vocab_size' is missing"):
        load({k: v for k, v in good.items() if k != "vocab_size"})
    with pytest.raises(ModelCardError, match="eos_token_ids must be a list"):
        load({**good, "eos_token_ids": 2})
    with pytest.raises(ModelCardError, match="cannot read"):
        load("{not json")
    (card_dir / "tokenizer.json").unlink()
    with pytest.raises(ModelCardError, match=r"no tokenizer\.json"):
        load(good)


# --- what is not a card -----------------------------------------------------------------


def test_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelCard.load(tmp_path / "missing")
    gguf = tmp_path / "model.Q4_0.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(ModelCardError, match=r"GGUF file.*pagoda prepare-model"):
        ModelCard.load(gguf)
    with pytest.raises(ModelCardError, match=r"holds model.Q4_0.gguf: run `pagoda prepare-model"):
        ModelCard.load(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelCardError, match="not a model folder"):
        ModelCard.load(tmp_path / "empty")
    with pytest.raises(ModelCardError, match=r"no tokenizer.json.*pagoda prepare-model"):
        ModelCard.load(make_folder(tmp_path / "notok", tokenizer=False))
    no_arch = {k: v for k, v in CONFIG.items() if k != "architectures"}
    with pytest.raises(ModelCardError, match="names no architectures"):
        ModelCard.load(make_folder(tmp_path / "noarch", no_arch))
    no_len = {k: v for k, v in CONFIG.items() if k != "max_position_embeddings"}
    with pytest.raises(ModelCardError, match="max_position_embeddings, n_positions"):
        ModelCard.load(make_folder(tmp_path / "nolen", no_len))
    no_weights = make_folder(tmp_path / "noweights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelCardError, match="no weights"):
        ModelCard.load(no_weights)


def test_card_modules_never_load_torch(tmp_path):
    folder = make_folder(tmp_path / "m")
    code = (
        "import sys\n"
        "import pagoda.entrypoints.cli, pagoda.default_model, pagoda.model_card.writer\n"
        "from pagoda.model_card.card import ModelCard\n"
        "ModelCard.load(sys.argv[1]).to_proto()\n"
        "pagoda.default_model.default_model_path()\n"
        "heavy = [m for m in ('torch', 'transformers', 'gguf', 'worker_svc') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    run_python(code, str(folder))
