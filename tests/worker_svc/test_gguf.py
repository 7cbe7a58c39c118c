"""GGUF files read as Hugging Face checkpoints, checked against transformers' own GGUF
loader: every tensor and config field of the default model, and small GGUF files
written here (untied head, F16 and Q8_0 tensors, biases, errors)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf import GGMLQuantizationType, GGUFWriter  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from pagoda.default_model import default_model_path  # noqa: E402
from pagoda.model_card.gguf_metadata import open_gguf, read_gguf_config, torch_shape  # noqa: E402
from worker_svc import gguf as pgguf  # noqa: E402
from worker_svc.gguf import GGUFError, hf_tensor_name, load_gguf, unpermute_qk  # noqa: E402

CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "max_position_embeddings",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, verbatim in numpy: the
    transformation that unpermute_qk must undo."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def hf_load(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def default_gguf():
    return default_model_path()


@pytest.fixture(scope="module")
def default_reader(default_gguf):
    """One reader for the module: parsing the 49k-token vocabulary takes seconds."""
    return open_gguf(default_gguf)


@pytest.fixture(scope="module")
def hf_default(default_gguf):
    """transformers' model of the default GGUF (de-quantized once for this module)."""
    return hf_load(default_gguf)


# --- the default model against transformers -------------------------------------------


def test_every_tensor_equals_transformers_exactly(default_reader, hf_default):
    state = hf_default.state_dict()
    config, tensors = load_gguf(default_reader, torch.float32)
    seen = []
    for name, tensor in tensors:
        ref = state[name]
        assert tensor.dtype == torch.float32
        assert tensor.shape == ref.shape, name
        assert torch.equal(tensor, ref), name
        seen.append(name)
    assert len(seen) == len(set(seen)) == 272
    # Tied embeddings: transformers' lm_head is embed_tokens; the file has no output.weight.
    assert config["tie_word_embeddings"] is True
    assert set(seen) == set(state) - {"lm_head.weight"}
    assert "model.layers.29.self_attn.k_proj.weight" in seen


def test_q_and_k_as_stored_differ_from_transformers(default_reader, hf_default):
    """Without the inverse permutation the test above would fail: proof it checks it."""
    state = hf_default.state_dict()
    stored = {t.name: t for t in default_reader.tensors}
    for gname, heads in (("blk.0.attn_q.weight", 9), ("blk.0.attn_k.weight", 3)):
        t = stored[gname]
        raw = dequantize(t.data, t.tensor_type).reshape(torch_shape(t))
        ref = state[hf_tensor_name(gname)].numpy()
        assert np.abs(raw - ref).max() > 0.1
        assert np.array_equal(unpermute_qk(raw, heads), ref)
        # The llama.cpp converter's permutation maps transformers' rows back to the stored ones.
        assert np.array_equal(llamacpp_permute(ref, 9, heads), raw)


def test_config_equals_transformers(default_reader, hf_default):
    config = read_gguf_config(default_reader)
    hf = hf_default.config
    for key in CONFIG_KEYS:
        assert config[key] == getattr(hf, key), key
    assert config["architectures"] == [type(hf_default).__name__] == ["LlamaForCausalLM"]
    assert config["rope_theta"] == 100000.0
    # The dict is a valid config.json: transformers builds the same config from it.
    rebuilt = transformers.AutoConfig.for_model(**config)
    for key in CONFIG_KEYS:
        assert getattr(rebuilt, key) == getattr(hf, key), key
    assert (config["vocab_size"], config["max_position_embeddings"]) == (49152, 8192)


def test_tensors_come_one_at_a_time_in_the_asked_dtype(default_reader, hf_default, monkeypatch):
    calls = []
    real = pgguf.dequantize

    def counting(data, qtype):
        calls.append(qtype)
        return real(data, qtype)

    monkeypatch.setattr(pgguf, "dequantize", counting)
    _, tensors = load_gguf(default_reader, torch.bfloat16)
    assert isinstance(tensors, types.GeneratorType)
    assert calls == []
    state = hf_default.state_dict()
    for i in range(3):
        name, tensor = next(tensors)
        assert len(calls) == i + 1
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, state[name].to(torch.bfloat16))


# --- the permutation --------------------------------------------------------------------


def test_unpermute_takes_even_rows_then_odd_rows_of_each_head():
    stored = np.arange(8 * 3).reshape(8, 3)  # 2 heads of head_dim 4, 3 columns
    rows = unpermute_qk(stored, 2)[:, 0] // 3
    assert rows.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    bias = np.arange(12.0)  # biases are permuted the same way
    assert unpermute_qk(bias, 3).tolist() == [0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11]


@pytest.mark.parametrize(("n_head", "n_kv"), [(4, 4), (4, 2), (6, 1)])
def test_unpermute_inverts_llamacpp_permute(n_head, n_kv):
    rng = np.random.default_rng(0)
    head_dim = 8
    q = rng.standard_normal((n_head * head_dim, 5)).astype(np.float32)
    k = rng.standard_normal((n_kv * head_dim, 5)).astype(np.float32)
    assert np.array_equal(unpermute_qk(llamacpp_permute(q, n_head, n_head), n_head), q)
    assert np.array_equal(unpermute_qk(llamacpp_permute(k, n_head, n_kv), n_kv), k)


# --- small GGUF files written here ------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, LAYERS = 64, 4, 2, 96, 40, 2
HEAD_DIM = HIDDEN // HEADS


def hf_tiny_weights(seed: int = 0, bias: bool = False) -> dict[str, np.ndarray]:
    """Random weights in transformers' layout (rows = output features)."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    weights = {
        "model.embed_tokens.weight": w(VOCAB, HIDDEN),
        "model.norm.weight": w(HIDDEN),
        "lm_head.weight": w(VOCAB, HIDDEN),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": w(HIDDEN),
            p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": w(HIDDEN, HEADS * HEAD_DIM),
            p + "post_attention_layernorm.weight": w(HIDDEN),
            p + "mlp.gate_proj.weight": w(FFN, HIDDEN),
            p + "mlp.up_proj.weight": w(FFN, HIDDEN),
            p + "mlp.down_proj.weight": w(HIDDEN, FFN),
        }
        if bias:
            weights |= {
                p + "self_attn.q_proj.bias": w(HEADS * HEAD_DIM),
                p + "self_attn.k_proj.bias": w(KV_HEADS * HEAD_DIM),
                p + "self_attn.v_proj.bias": w(KV_HEADS * HEAD_DIM),
            }
    return weights


def write_tiny_gguf(
    path, weights, *, arch="llama", extra_tensors=(), quantize_qk=False, rope_scaling=None
):
    """A GGUF file as llama.cpp's converter writes one: GGUF names, q/k rows permuted,
    matrices in F16 (q/k optionally Q8_0), vectors in F32."""
    gguf_name = {v: k for k, v in pgguf._GLOBAL_NAMES.items()}
    for short, long in pgguf._LAYER_NAMES.items():
        for i in range(LAYERS):
            for kind in ("weight", "bias"):
                gguf_name[f"model.layers.{i}.{long}.{kind}"] = f"blk.{i}.{short}.{kind}"
    writer = GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(VOCAB)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(7)
    if rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_scaling)
    for name, array in weights.items():
        if ".q_proj." in name:
            array = llamacpp_permute(array, HEADS, HEADS)
        elif ".k_proj." in name:
            array = llamacpp_permute(array, HEADS, KV_HEADS)
        if quantize_qk and array.ndim == 2 and (".q_proj." in name or ".k_proj." in name):
            qtype = GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name[name], quantize(array, qtype), raw_dtype=qtype)
        elif array.ndim == 2:
            writer.add_tensor(gguf_name[name], array.astype(np.float16))
        else:
            writer.add_tensor(gguf_name[name], array)
    for name, array in extra_tensors:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_untied_f16_file_round_trips_the_converter(tmp_path):
    weights = hf_tiny_weights(bias=True)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", weights)
    config, tensors = load_gguf(path)
    got = dict(tensors)
    assert set(got) == set(weights)
    for name, ref in weights.items():
        expected = ref.astype(np.float16).astype(np.float32) if ref.ndim == 2 else ref
        assert np.array_equal(got[name].numpy(), expected), name
    assert config["tie_word_embeddings"] is False
    assert config["attention_bias"] is True
    assert config["eos_token_id"] == [2, 7]  # EOS and end-of-turn
    assert (config["head_dim"], config["num_key_value_heads"]) == (HEAD_DIM, KV_HEADS)
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    assert "rope_scaling" not in config


def test_small_quantized_file_matches_transformers(tmp_path):
    path = write_tiny_gguf(tmp_path / "q.gguf", hf_tiny_weights(seed=1), quantize_qk=True)
    state = hf_load(path).state_dict()
    config, tensors = load_gguf(path)
    got = dict(tensors)
    assert set(got) == set(state)
    for name, tensor in got.items():
        assert torch.equal(tensor, state[name]), name
    assert config["tie_word_embeddings"] is False


def test_linear_rope_scaling_is_carried(tmp_path):
    path = write_tiny_gguf(tmp_path / "r.gguf", hf_tiny_weights(), rope_scaling=4.0)
    config = read_gguf_config(path)
    scaling = {"rope_type": "linear", "factor": 4.0}
    assert config["rope_scaling"] == scaling
    assert config["rope_parameters"] == {**scaling, "rope_theta": 500000.0}


def test_other_architectures_are_refused_naming_the_supported_ones(tmp_path):
    path = write_tiny_gguf(tmp_path / "g.gguf", hf_tiny_weights(), arch="gpt2")
    with pytest.raises(GGUFError, match=r"'gpt2' is not supported; supported: llama"):
        load_gguf(path)


def test_unknown_tensors_are_refused_before_any_tensor_is_read(tmp_path):
    extra = [("blk.0.ffn_gate_exps.weight", np.zeros((2, 4), np.float32))]
    path = write_tiny_gguf(tmp_path / "m.gguf", hf_tiny_weights(), extra_tensors=extra)
    with pytest.raises(GGUFError, match=r"blk\.0\.ffn_gate_exps\.weight"):
        load_gguf(path)
    rope = [("rope_freqs.weight", np.ones(HEAD_DIM // 2, np.float32))]
    path = write_tiny_gguf(tmp_path / "f.gguf", hf_tiny_weights(), extra_tensors=rope)
    with pytest.raises(GGUFError, match="rope_freqs"):
        load_gguf(path)


def test_files_that_are_not_gguf(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        load_gguf(tmp_path / "missing.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        load_gguf(fake)
