"""GPT-2: learned positions, LayerNorm, fused c_attn stored as Conv1D (transposed), tied head."""

from __future__ import annotations

import torch
from torch import nn

from pagoda_kernels.dispatch import Ops
from worker_svc.layers.attention import Attention, AttentionMetadata
from worker_svc.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker_svc.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from worker_svc.layers.norm import LayerNorm
from worker_svc.models.activations import activation
from worker_svc.models.weights import WeightMap, load_weights

# Checkpoint tensors that are buffers, not parameters.
_BUFFERS = (".attn.bias", ".attn.masked_bias")
# Conv1D layers store their weight as [in, out].
_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


class GPT2Attention(nn.Module):
    def __init__(self, config: dict, layer: int, ops: Ops, tp=(0, 1)):
        super().__init__()
        hidden, heads = config["n_embd"], config["n_head"]
        head_dim = hidden // heads
        self.c_attn = QKVParallelLinear(hidden, head_dim, heads, heads, True, *tp)
        self.c_proj = RowParallelLinear(hidden, hidden, True, *tp)
        scale = head_dim**-0.5 if config.get("scale_attn_weights", True) else 1.0
        if config.get("scale_attn_by_inverse_layer_idx", False):
            scale /= layer + 1
        local_heads = self.c_attn.num_heads
        self.size = local_heads * head_dim
        self.attn = Attention(local_heads, local_heads, head_dim, scale, ops)

    def forward(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(hidden).split([self.size] * 3, dim=-1)
        return self.c_proj(self.attn(q, k, v, meta))


class GPT2Block(nn.Module):
    def __init__(self, config: dict, layer: int, ops: Ops, tp=(0, 1)):
        super().__init__()
        hidden = config["n_embd"]
        inner = config.get("n_inner") or 4 * hidden
        eps = config.get("layer_norm_epsilon", 1e-5)
        self.ln_1 = LayerNorm(hidden, eps)
        self.attn = GPT2Attention(config, layer, ops, tp)
        self.ln_2 = LayerNorm(hidden, eps)
        self.mlp = nn.Module()
        self.mlp.c_fc = ColumnParallelLinear(hidden, inner, True, *tp)
        self.mlp.c_proj = RowParallelLinear(inner, hidden, True, *tp)
        self.act = activation(config.get("activation_function", "gelu_new"))

    def forward(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden), meta)
        return hidden + self.mlp.c_proj(self.act(self.mlp.c_fc(self.ln_2(hidden))))


class GPT2Model(nn.Module):
    def __init__(self, config: dict, ops: Ops, tp=(0, 1)):
        super().__init__()
        hidden = config["n_embd"]
        self.wte = VocabParallelEmbedding(config["vocab_size"], hidden, *tp)
        self.wpe = VocabParallelEmbedding(config["n_positions"], hidden)  # replicated
        self.h = nn.ModuleList(GPT2Block(config, i, ops, tp) for i in range(config["n_layer"]))
        self.ln_f = LayerNorm(hidden, config.get("layer_norm_epsilon", 1e-5))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            hidden = block(hidden, meta)
        return self.ln_f(hidden)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config: dict, ops: Ops, tp=(0, 1)):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config, ops, tp)
        self.lm_head = ParallelLMHead(config["vocab_size"], config["n_embd"], *tp)
        self.lm_head.tie(self.transformer.wte)  # GPT-2 always ties its head

    def forward(self, input_ids, positions, meta) -> torch.Tensor:
        return self.transformer(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)

    def load_weights(self, weights) -> None:
        def rename(name: str) -> str | None:
            if name.endswith(_BUFFERS) or name == "lm_head.weight":
                return None
            return name if name.startswith("transformer.") else f"transformer.{name}"

        mapping = WeightMap(rename=rename, transposed=lambda name: name.endswith(_CONV1D))
        load_weights(self, weights, mapping)
