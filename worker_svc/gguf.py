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

The config comes from ``pagoda.model_card.gguf_metadata``, which reads the metadata
without torch (a card needs the config but not the tensors); this module adds the
tensors, which need torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from pagoda.model_card.gguf_metadata import GGUFError, gguf_config, open_gguf, torch_shape

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


def _tensors(
    plan: list[tuple[ReaderTensor, str]], config: dict[str, Any], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    heads = {
        "q_proj": config["num_attention_heads"],
        "k_proj": config["num_key_value_heads"],
    }
    for tensor, name in plan:
        array = dequantize(tensor.data, tensor.tensor_type).reshape(torch_shape(tensor))
        proj = name.split(".")[-2]
        if proj in heads:
            array = unpermute_qk(array, heads[proj])
        if not array.flags.writeable or not array.flags.c_contiguous:
            # Views of the read-only memory map (float32 tensors) or of a permutation.
            array = np.array(array, order="C")
        yield name, torch.from_numpy(array).to(dtype)
