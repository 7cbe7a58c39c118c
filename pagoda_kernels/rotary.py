"""Rotary position embeddings applied to queries and keys."""

from __future__ import annotations

import torch


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``query [T, H, D]`` and ``key [T, KVH, D]`` by their token ``positions``.

    ``cos_sin_cache [max_position, D]`` holds ``cos`` in its first half and ``sin`` in
    its second (float32). The neox style rotates the two halves of each head
    (Llama, Mistral, Qwen); the GPT-J style rotates interleaved pairs. cos and sin
    are cast to the activations' dtype first, as transformers does.
    """
    cos, sin = cos_sin_cache.index_select(0, positions).to(query.dtype).chunk(2, dim=-1)
    if is_neox:
        cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)
        sin = torch.cat((sin, sin), dim=-1).unsqueeze(1)
        return _rotate_neox(query, cos, sin), _rotate_neox(key, cos, sin)
    cos = cos.repeat_interleave(2, dim=-1).unsqueeze(1)
    sin = sin.repeat_interleave(2, dim=-1).unsqueeze(1)
    return _rotate_gptj(query, cos, sin), _rotate_gptj(key, cos, sin)


def _rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _rotate_gptj(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1 = x[..., 0::2]
    x2 = x[..., 1::2]
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return x * cos + rotated * sin
