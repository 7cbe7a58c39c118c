"""The Llama family: Llama 2/3, Mistral (sliding window), Qwen2 (q/k/v bias), Qwen3 (q/k norm).

One implementation, configured by the architecture name and the checkpoint's
config.json; every forward runs over a flattened batch (all tokens of all
sequences in one dimension) with positions and the step's AttentionMetadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagoda_kernels.dispatch import Ops
from worker_svc.layers.attention import Attention, AttentionMetadata
from worker_svc.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker_svc.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from worker_svc.layers.norm import RMSNorm
from worker_svc.layers.rotary import RotaryEmbedding, rope_settings
from worker_svc.models.weights import Fused, WeightMap, load_weights


@dataclass(frozen=True)
class Variant:
    """What sets one member of the family apart."""

    qkv_bias: bool | None = None  # None: the config's attention_bias
    o_bias: bool | None = None  # None: the config's attention_bias
    qk_norm: bool = False


VARIANTS = {
    "LlamaForCausalLM": Variant(),
    "MistralForCausalLM": Variant(qkv_bias=False, o_bias=False),
    "Qwen2ForCausalLM": Variant(qkv_bias=True, o_bias=False),
    "Qwen3ForCausalLM": Variant(qk_norm=True),
}


def sliding_windows(config: dict[str, Any]) -> list[int | None]:
    """The attention window of each layer (None: full attention)."""
    layers = config["num_hidden_layers"]
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if not window:
        return [None] * layers
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    if "use_sliding_window" in config:  # Qwen-style configs without layer_types
        if not config["use_sliding_window"]:
            return [None] * layers
        first = config.get("max_window_layers", layers)
        return [window if i >= first else None for i in range(layers)]
    return [window] * layers  # Mistral: every layer


def head_dim_of(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def make_rotary(config: dict, ops: Ops) -> RotaryEmbedding:
    """One cos/sin table for the whole model, shared by its layers."""
    theta, scaling = rope_settings(config)
    max_pos = config.get("max_position_embeddings", 2048)
    return RotaryEmbedding(head_dim_of(config), max_pos, theta, scaling, ops)


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: dict,
        variant: Variant,
        window: int | None,
        rotary: RotaryEmbedding,
        ops: Ops,
        tp=(0, 1),
    ):
        super().__init__()
        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = head_dim_of(config)
        bias = bool(config.get("attention_bias", False))
        qkv_bias = bias if variant.qkv_bias is None else variant.qkv_bias
        o_bias = bias if variant.o_bias is None else variant.o_bias
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, heads, kv_heads, qkv_bias, *tp)
        self.o_proj = RowParallelLinear(heads * head_dim, hidden, o_bias, *tp)
        self.heads = self.qkv_proj.num_heads
        self.kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.q_size = self.heads * head_dim
        self.kv_size = self.kv_heads * head_dim
        eps = config.get("rms_norm_eps", 1e-6)
        self.q_norm = RMSNorm(head_dim, eps, ops) if variant.qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps, ops) if variant.qk_norm else None
        self.rotary = rotary
        self.attn = Attention(self.heads, self.kv_heads, head_dim, head_dim**-0.5, ops, window)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(tokens, self.heads, self.head_dim)
        k = k.reshape(tokens, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaMLP(nn.Module):
    def __init__(self, config: dict, ops: Ops, tp=(0, 1)):
        super().__init__()
        hidden, inter = config["hidden_size"], config["intermediate_size"]
        bias = bool(config.get("mlp_bias", False))
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"activation {act!r} is not supported for this architecture (silu)")
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias, *tp)
        self.down_proj = RowParallelLinear(inter, hidden, bias, *tp)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: dict,
        variant: Variant,
        window: int | None,
        rotary: RotaryEmbedding,
        ops: Ops,
        tp=(0, 1),
    ):
        super().__init__()
        eps = config.get("rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(config["hidden_size"], eps, ops)
        self.self_attn = LlamaAttention(config, variant, window, rotary, ops, tp)
        self.post_attention_layernorm = RMSNorm(config["hidden_size"], eps, ops)
        self.mlp = LlamaMLP(config, ops, tp)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: dict, variant: Variant, ops: Ops, tp=(0, 1)):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config["vocab_size"], config["hidden_size"], *tp)
        rotary = make_rotary(config, ops)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, variant, window, rotary, ops, tp)
            for window in sliding_windows(config)
        )
        self.norm = RMSNorm(config["hidden_size"], config.get("rms_norm_eps", 1e-6), ops)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: dict, ops: Ops, tp=(0, 1)):
        super().__init__()
        variant = VARIANTS.get(config["architectures"][0], Variant())
        self.config = config
        self.model = LlamaModel(config, variant, ops, tp)
        self.lm_head = ParallelLMHead(config["vocab_size"], config["hidden_size"], *tp)
        self.tied = bool(config.get("tie_word_embeddings", False))
        if self.tied:
            self.lm_head.tie(self.model.embed_tokens)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)

    def load_weights(self, weights) -> None:
        tied = self.tied

        def rename(name: str) -> str | None:
            if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
                return None
            return name

        fused = [
            Fused(".q_proj.", ".qkv_proj.", "q"),
            Fused(".k_proj.", ".qkv_proj.", "k"),
            Fused(".v_proj.", ".qkv_proj.", "v"),
            Fused(".gate_proj.", ".gate_up_proj.", 0),
            Fused(".up_proj.", ".gate_up_proj.", 1),
        ]
        load_weights(self, weights, WeightMap(fused=fused, rename=rename))
