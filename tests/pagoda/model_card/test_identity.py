"""The model identity: the pinned hash, what it ignores and what it follows, and the
weight index of safetensors and pickled folders read without torch."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from pagoda.model_card.card import ModelCard
from pagoda.model_card.errors import ModelCardError
from pagoda.model_card.identity import (
    WEIGHT_SAMPLE_BYTES,
    hf_folder_identity,
    hf_weight_index,
    model_identity,
    safetensors_index,
)
from tests.pagoda.model_card.folders import (
    CONFIG,
    make_folder,
    run_python,
    safetensors_numpy,
    weights,
)


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
        "from pagoda.model_card.card import ModelCard\n"
        "print(ModelCard.load(sys.argv[1]).identity)\n"
    )
    assert run_python(code, str(folder)).strip() == ModelCard.load(folder).identity
