"""OPT: learned positions offset by 2, ReLU, pre- or post-layer-norm, optional embedding projection.

OPT-350m is the odd one: its layers normalise after the residual add
(``do_layer_norm_before: false``) and its embeddings are narrower than the hidden
size (``word_embed_proj_dim``), with ``project_in`` / ``project_out`` around the layers.
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda_kernels.dispatch import Ops
from worker_svc.layers.attention import Attention, AttentionMetadata
from worker_svc.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker_svc.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from worker_svc.layers.norm import LayerNorm
from worker_svc.models.activations import activation
from worker_svc.models.weights import Fused, WeightMap, load_weights

POSITION_OFFSET = 2  # OPT's learned positions start at row 2


def _layer_norm(config: dict, size: int) -> LayerNorm:
    return LayerNorm(size, 1e-5, affine=config.get("layer_norm_elementwise_affine", True))


class OPTAttention(nn.Module):
    def __init__(self, config: dict, ops: Ops, tp=(0, 1)):
        super().__init__()
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        head_dim = hidden // heads
        bias = config.get("enable_bias", True)
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, heads, heads, bias, *tp)
        self.out_proj = RowParallelLinear(hidden, hidden, bias, *tp)
        self.size = self.qkv_proj.num_heads * head_dim
        local = self.qkv_proj.num_heads
        self.attn = Attention(local, local, head_dim, head_dim**-0.5, ops)

    def forward(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.size] * 3, dim=-1)
        return self.out_proj(self.attn(q, k, v, meta))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: dict, ops: Ops, tp=(0, 1)):
        super().__init__()
        hidden, ffn = config["hidden_size"], config["ffn_dim"]
        bias = config.get("enable_bias", True)
        self.pre_norm = config.get("do_layer_norm_before", True)
        self.self_attn = OPTAttention(config, ops, tp)
        self.self_attn_layer_norm = _layer_norm(config, hidden)
        self.fc1 = ColumnParallelLinear(hidden, ffn, bias, *tp)
        self.fc2 = RowParallelLinear(ffn, hidden, bias, *tp)
        self.final_layer_norm = _layer_norm(config, hidden)
        self.act = activation(config.get("activation_function", "relu"))

    def forward(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.pre_norm:
            hidden = hidden + self.self_attn(self.self_attn_layer_norm(hidden), meta)
            return hidden + self.fc2(self.act(self.fc1(self.final_layer_norm(hidden))))
        hidden = self.self_attn_layer_norm(hidden + self.self_attn(hidden, meta))
        return self.final_layer_norm(hidden + self.fc2(self.act(self.fc1(hidden))))


class OPTDecoder(nn.Module):
    def __init__(self, config: dict, ops: Ops, tp=(0, 1)):
        super().__init__()
        hidden = config["hidden_size"]
        embed_dim = config.get("word_embed_proj_dim") or hidden
        self.embed_tokens = VocabParallelEmbedding(config["vocab_size"], embed_dim, *tp)
        self.embed_positions = VocabParallelEmbedding(
            config["max_position_embeddings"] + POSITION_OFFSET, hidden
        )
        projected = embed_dim != hidden
        self.project_in = ReplicatedLinear(embed_dim, hidden, False) if projected else None
        self.project_out = ReplicatedLinear(hidden, embed_dim, False) if projected else None
        final = config.get("do_layer_norm_before", True) and not config.get(
            "_remove_final_layer_norm", False
        )
        self.final_layer_norm = _layer_norm(config, hidden) if final else None
        self.layers = nn.ModuleList(
            OPTDecoderLayer(config, ops, tp) for _ in range(config["num_hidden_layers"])
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        hidden = hidden + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            hidden = layer(hidden, meta)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


class OPTForCausalLM(nn.Module):
    def __init__(self, config: dict, ops: Ops, tp=(0, 1)):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.decoder = OPTDecoder(config, ops, tp)
        embed_dim = config.get("word_embed_proj_dim") or config["hidden_size"]
        self.lm_head = ParallelLMHead(config["vocab_size"], embed_dim, *tp)
        self.tied = bool(config.get("tie_word_embeddings", True))
        if self.tied:
            self.lm_head.tie(self.model.decoder.embed_tokens)

    def forward(self, input_ids, positions, meta) -> torch.Tensor:
        return self.model.decoder(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)

    def load_weights(self, weights) -> None:
        tied = self.tied

        def rename(name: str) -> str | None:
            if tied and name == "lm_head.weight":
                return None
            return f"model.{name}" if name.startswith("decoder.") else name

        fused = [
            Fused(".q_proj.", ".qkv_proj.", "q"),
            Fused(".k_proj.", ".qkv_proj.", "k"),
            Fused(".v_proj.", ".qkv_proj.", "v"),
        ]
        load_weights(self, weights, WeightMap(fused=fused, rename=rename))
