"""Loading checkpoints as real ones are laid out, and the errors a user sees when one is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagoda_kernels.dispatch import TORCH
from tests.worker_svc.hf_oracle import build_model
from worker_svc.loader import load_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loader")


def load(path: Path):
    return load_model(path, "float32", CPU, TORCH, show_progress=False)[0]


def same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name, tensor in pa.items():
        assert torch.equal(tensor, pb[name]), name


def rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of a model folder whose single safetensors file went through ``edit(dict)``."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_gpt2_with_and_without_the_transformer_prefix_and_with_its_buffers(root):
    src = build_model("gpt2", root)
    reference = load(src)

    def strip_prefix_add_buffers(t: dict) -> None:
        for name in list(t):
            t[name.removeprefix("transformer.")] = t.pop(name)
        t["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
        t["h.0.attn.masked_bias"] = torch.tensor(-1e4)
        t["lm_head.weight"] = t["wte.weight"].clone()

    same_parameters(load(rewrite(src, root / "gpt2-bare", strip_prefix_add_buffers)), reference)


def test_opt_with_decoder_or_model_decoder_names(root):
    src = build_model("opt", root)
    reference = load(src)

    def decoder_prefix(t: dict) -> None:
        for name in list(t):
            t[name.removeprefix("model.")] = t.pop(name)

    same_parameters(load(rewrite(src, root / "opt-decoder", decoder_prefix)), reference)


def test_sharded_safetensors_and_pytorch_bin(root):
    src = build_model("llama", root)
    reference = load(src)
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    sharded = root / "llama-sharded"
    sharded.mkdir()
    shutil.copy(src / "config.json", sharded / "config.json")
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, sharded / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    same_parameters(load(sharded), reference)

    legacy = root / "llama-bin"
    legacy.mkdir()
    shutil.copy(src / "config.json", legacy / "config.json")
    state = {n: t.clone() for n, t in tensors.items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old checkpoints
    torch.save(state, legacy / "pytorch_model.bin")
    same_parameters(load(legacy), reference)


def test_clear_errors(root):
    src = build_model("llama", root)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(root / "nowhere")
    empty = root / "no-weights"
    empty.mkdir()
    shutil.copy(src / "config.json", empty / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights"):
        load(empty)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load(root)

    unsupported = root / "falcon"
    shutil.copytree(src, unsupported)
    config = json.loads((unsupported / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (unsupported / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"unsupported architecture FalconForCausalLM.*LlamaForCausalLM"
    ):
        load(unsupported)

    extra = rewrite(src, root / "extra", lambda t: t.update({"model.surprise": torch.ones(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.surprise"):
        load(extra)
    missing = rewrite(src, root / "missing", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.norm\.weight"):
        load(missing)
    partial = rewrite(
        src, root / "partial", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight")
    )
    with pytest.raises(
        ValueError, match=r"missing tensors: model.layers.1.self_attn.qkv_proj.weight \(k\)"
    ):
        load(partial)

    def shrink(t: dict) -> None:
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"][
            :, :7
        ].contiguous()

    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*shape"):
        load(rewrite(src, root / "misshapen", shrink))
