"""What a GGUF file's metadata says, as the Hugging Face config it implies.

A GGUF file (llama.cpp's format, the form of the default model) keeps its
hyper-parameters and its tokenizer in key-value metadata. A card needs them (the
architecture, the vocab size, the EOS ids, the longest sequence) and so does the
identity, but not the weights: this module reads the metadata and a few bytes per
tensor, and never imports torch. The ``gguf`` package (numpy only) is imported inside
the functions that open a file, so that the card reader can ask ``is_gguf_file``
without it. The worker's ``worker_svc.gguf`` de-quantizes the tensors.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagoda.model_card.identity import WEIGHT_SAMPLE_BYTES, canonical_json

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor

GGUF_MAGIC = b"GGUF"
# GGUF ``general.architecture`` -> (transformers architecture, model_type).
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama")}
# llama.cpp's default RoPE base when the file names none.
_DEFAULT_ROPE_THETA = 10000.0


class GGUFError(ValueError):
    """A GGUF file that pagoda cannot read as a checkpoint, and why."""


def is_gguf_file(path: str | Path) -> bool:
    """True for a file that starts with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def open_gguf(path: str | Path) -> GGUFReader:
    """A reader over a GGUF file (memory-mapped), with clear errors for other files."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    if not is_gguf_file(path):
        raise GGUFError(f"{str(path)!r} is not a GGUF file (no GGUF magic)")
    return GGUFReader(path)


def read_gguf_config(path: str | Path | GGUFReader) -> dict[str, Any]:
    """Only the config of a GGUF model (reads the metadata, no tensor data)."""
    from gguf import GGUFReader

    return gguf_config(path if isinstance(path, GGUFReader) else open_gguf(path))


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
            torch_shape(t),
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
    return canonical_json(fields, allow_nan=True)


def torch_shape(tensor: ReaderTensor) -> list[int]:
    """A tensor's shape in torch order, rows first (GGUF lists the columns first)."""
    return [int(d) for d in reversed(tensor.shape.tolist())]


def _embedding_rows(reader: GGUFReader) -> int:
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            return torch_shape(tensor)[0]
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
        from gguf import GGUFValueType

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
