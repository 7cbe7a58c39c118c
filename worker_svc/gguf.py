"""GGUF files read as if they were Hugging Face checkpoints.

The weight loader maps Hugging Face tensor names onto pagoda's modules; a GGUF file
(llama.cpp's format, the form of the default model) enters through the same door:
``load_gguf`` returns the ``config.json`` that transformers would hold for the model
and its tensors under transformers' names, de-quantized one at a time (a quantized
file is several times smaller than its de-quantized weights, so holding all of them
at once would multiply the loader's peak memory).

llama.cpp stores the rows of ``attn_q`` and ``attn_k`` permuted (its rotary embedding
rotates adjacent pairs, transformers' rotates the two halves of each head); the
tensors come out with that permutation undone, equal to what transformers loads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType, ReaderTensor
from gguf.quants import dequantize

from pagoda.model_card import WEIGHT_SAMPLE_BYTES

# GGUF ``general.architecture`` -> (transformers architecture, model_type).
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama")}
# llama.cpp's default RoPE base when the file names none.
_DEFAULT_ROPE_THETA = 10000.0

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


class GGUFError(ValueError):
    """A GGUF file that pagoda cannot read as a checkpoint, and why."""


def load_gguf(
    path: str | Path | GGUFReader, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, Any], Iterator[tuple[str, torch.Tensor]]]:
    """The Hugging Face config of a GGUF model and its tensors under transformers' names.

    Names, the config and the permutation are checked before this returns; the tensors
    are de-quantized (to float32, then cast to ``dtype``) only as the iterator is
    advanced, one at a time. A file without ``output.weight`` has tied embeddings: no
    ``lm_head.weight`` is yielded and the config says ``tie_word_embeddings``. ``path``
    may be a reader already open (parsing the metadata of a large vocabulary takes
    seconds).
    """
    reader = path if isinstance(path, GGUFReader) else open_gguf(path)
    config = gguf_config(reader)
    plan = [(tensor, hf_tensor_name(tensor.name)) for tensor in reader.tensors]
    return config, _tensors(plan, config, dtype)


def read_gguf_config(path: str | Path | GGUFReader) -> dict[str, Any]:
    """Only the config of a GGUF model (reads the metadata, no tensor data)."""
    return gguf_config(path if isinstance(path, GGUFReader) else open_gguf(path))


def open_gguf(path: str | Path) -> GGUFReader:
    """A reader over a GGUF file (memory-mapped), with clear errors for other files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{str(path)!r} is not a GGUF file (no GGUF magic)")
    return GGUFReader(path)


def gguf_config(reader: GGUFReader) -> dict[str, Any]:
    """The ``config.json`` that transformers would hold for this GGUF model."""
    meta = _Metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise GGUFError(
            f"GGUF architecture {arch!r} is not supported; supported: {supported} "
            f"(general.architecture of {meta.path})"
        )
    architecture, model_type = ARCHITECTURES[arch]
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise GGUFError(
            f"{meta.path} has per-dimension RoPE frequency factors (rope_freqs.weight, as "
            f"Llama 3.1 GGUFs do), which pagoda does not support"
        )
    hidden = meta.integer(f"{arch}.embedding_length")
    heads = meta.integer(f"{arch}.attention.head_count")
    kv_heads = meta.integer(f"{arch}.attention.head_count_kv", heads)
    head_dim = meta.integer(f"{arch}.attention.key_length", 0) or meta.integer(
        f"{arch}.rope.dimension_count", hidden // heads
    )
    vocab = meta.integer(f"{arch}.vocab_size", 0) or _embedding_rows(reader)
    rope_theta = float(meta.get(f"{arch}.rope.freq_base", _DEFAULT_ROPE_THETA))
    rope_scaling = _rope_scaling(meta, arch)
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta.integer(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta.integer(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": meta.integer(f"{arch}.context_length"),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, **rope_scaling},
        "attention_bias": any(re.fullmatch(r"blk\.\d+\.attn_[qkv]\.bias", n) for n in names),
        "mlp_bias": any(re.fullmatch(r"blk\.\d+\.ffn_\w+\.bias", n) for n in names),
        "tie_word_embeddings": "output.weight" not in names,
    }
    if rope_scaling:
        config["rope_scaling"] = dict(rope_scaling)
    for hf_key, key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}", None)
        if value is not None:
            config[hf_key] = int(value)
    # A chat model's end-of-turn (and end-of-message) token ends generation too, as in
    # the generation_config.json of such models.
    eos = [
        int(v)
        for key in ("eos", "eot", "eom")
        if (v := meta.get(f"tokenizer.ggml.{key}_token_id", None)) is not None
    ]
    eos = list(dict.fromkeys(eos))
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return config


def hf_tensor_name(gguf_name: str) -> str:
    """The transformers (``LlamaForCausalLM``) name of a llama GGUF tensor."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    raise GGUFError(f"GGUF tensor {gguf_name!r} has no counterpart in LlamaForCausalLM")


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of ``attn_q`` / ``attn_k`` (weights or biases).

    llama.cpp's converter views each head's rows as (2, head_dim/2) and transposes them
    to (head_dim/2, 2), so transformers' row ``s * head_dim/2 + j`` of a head is stored
    as row ``2 * j + s``. Undone: within each head, the even stored rows followed by the
    odd ones. ``n_heads`` is the query head count for q and the KV head count for k.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise GGUFError(f"{rows} rows cannot be split into {n_heads} heads of pairs")
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_weight_index(reader: GGUFReader) -> list[list[Any]]:
    """``[name, shape, ggml type, sample hex]`` per tensor, for the model identity.

    Names and types are the file's own (a Q4_1 and a Q8_0 file differ); shapes are in
    torch order (rows first); the sample is the first ``WEIGHT_SAMPLE_BYTES`` of the
    stored data.
    """
    data = reader.data
    return [
        [
            t.name,
            _torch_shape(t),
            t.tensor_type.name,
            bytes(data[t.data_offset : t.data_offset + min(WEIGHT_SAMPLE_BYTES, t.n_bytes)]).hex(),
        ]
        for t in reader.tensors
    ]


def gguf_tokenizer_bytes(reader: GGUFReader) -> bytes:
    """The canonical JSON of every ``tokenizer.*`` metadata field: the tokenizer part of
    a GGUF model's identity (its converted tokenizer.json depends on the converter's
    version, the metadata does not)."""
    meta = _Metadata(reader)
    fields = {k: meta.get(k) for k in reader.fields if k.startswith("tokenizer.")}
    # Token scores may be infinite; JSON's NaN/Infinity spellings are deterministic too.
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _tensors(
    plan: list[tuple[ReaderTensor, str]], config: dict[str, Any], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    heads = {
        "q_proj": config["num_attention_heads"],
        "k_proj": config["num_key_value_heads"],
    }
    for tensor, name in plan:
        array = dequantize(tensor.data, tensor.tensor_type).reshape(_torch_shape(tensor))
        proj = name.split(".")[-2]
        if proj in heads:
            array = unpermute_qk(array, heads[proj])
        if not array.flags.writeable or not array.flags.c_contiguous:
            # Views of the read-only memory map (float32 tensors) or of a permutation.
            array = np.array(array, order="C")
        yield name, torch.from_numpy(array).to(dtype)


def _torch_shape(tensor: ReaderTensor) -> list[int]:
    # GGUF lists dimensions fastest-varying first (ne0 = columns).
    return [int(d) for d in reversed(tensor.shape.tolist())]


def _embedding_rows(reader: GGUFReader) -> int:
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            return _torch_shape(tensor)[0]
    raise GGUFError("the GGUF file names no vocab_size and has no token_embd.weight")


def _rope_scaling(meta: _Metadata, arch: str) -> dict[str, Any]:
    """RoPE scaling in transformers' ``rope_parameters`` form (empty when none)."""
    kind = meta.get(f"{arch}.rope.scaling.type", None)
    factor = meta.get(f"{arch}.rope.scaling.factor", None)
    if kind is None and (linear := meta.get(f"{arch}.rope.scale_linear", None)) is not None:
        kind, factor = "linear", linear
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return {}
    if kind not in ("linear", "yarn"):
        raise GGUFError(f"RoPE scaling {kind!r} in {meta.path} is not supported (linear, yarn)")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    if kind == "yarn":
        optional = {
            "original_context_length": ("original_max_position_embeddings", int),
            "attn_factor": ("attention_factor", float),
            "yarn_beta_fast": ("beta_fast", float),
            "yarn_beta_slow": ("beta_slow", float),
        }
        for key, (hf_key, kind_of) in optional.items():
            value = meta.get(f"{arch}.rope.scaling.{key}", None)
            if value is not None:
                scaling[hf_key] = kind_of(value)
    return scaling


_REQUIRED = object()


class _Metadata:
    """Typed access to a reader's key-value fields, naming the file in errors."""

    def __init__(self, reader: GGUFReader) -> None:
        self.reader = reader
        self.path = str(getattr(reader.data, "filename", "") or "the GGUF file")

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise GGUFError(f"{self.path} lacks the metadata key {key!r}")
            return default
        value = field.contents()
        if field.types and field.types[0] == GGUFValueType.ARRAY and not isinstance(value, list):
            value = list(value)
        return value

    def integer(self, key: str, default: Any = _REQUIRED) -> int:
        value = self.get(key, default)
        if isinstance(value, list):
            raise GGUFError(f"{self.path}: per-layer values of {key!r} are not supported")
        return int(value)
