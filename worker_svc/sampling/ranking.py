"""Ranking tokens without sorting rows: a blocked argmax, and the k best candidates in a
strict total order (higher logit first, then lower token id).

The total order makes top-k keep exactly k tokens and a row's result independent of how
many candidates the batch happened to gather. Both functions look at blocks of a row
first, because torch's CPU argmax is not vectorized and a full sort of 64 x 49k logits
costs over 100 ms.
"""

from __future__ import annotations

import torch

# Block widths: the argmax reduces a row block by block (a blocked amax is vectorized);
# top-k/top-p candidates come from the best blocks of _CANDIDATE_BLOCK tokens.
_ARGMAX_BLOCK = 256
_CANDIDATE_BLOCK = 32


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise index of the first maximum, as ``torch.argmax``, found block by block.

    torch's CPU argmax is not vectorized (1.7 ms for 64 x 32k float32, one thread); a
    blocked amax is, and the first block holding the row maximum holds its first
    occurrence. About 0.2 ms for 64 x 32k.
    """
    rows, width = x.shape
    if width <= 2 * _ARGMAX_BLOCK:
        return x.argmax(-1)
    blocks = width // _ARGMAX_BLOCK
    whole = blocks * _ARGMAX_BLOCK
    block_max = x[:, :whole].reshape(rows, blocks, _ARGMAX_BLOCK).amax(-1)
    if whole < width:
        block_max = torch.cat([block_max, x[:, whole:].amax(-1, keepdim=True)], 1)
    start = block_max.argmax(-1) * _ARGMAX_BLOCK
    cols = start[:, None] + torch.arange(_ARGMAX_BLOCK, device=x.device)
    # A short last block repeats its last column; the first maximum comes before repeats.
    cols.clamp_(max=width - 1)
    return start + x.gather(1, cols).argmax(-1)


def order_keys(values: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """int64 keys in the candidates' total order: higher value first, then lower index.

    The float32 bits, sign-extended, are mapped to integers of the same order (negative
    floats have their magnitude bits flipped; -0.0 is first made +0.0 so equal values tie
    exactly), shifted up, and the reversed index fills the low 32 bits. ``index``
    broadcasts against ``values``.
    """
    keys = values.add(0.0).view(torch.int32).to(torch.int64)
    keys ^= (keys >> 31) & 0x7FFFFFFF
    keys *= 1 << 32
    keys += (width - 1) - index
    return keys


def top_candidates(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best tokens of each row in the total order: (values, token ids), best first.

    The k best tokens lie in the k best blocks (blocks ranked by their maximum, the lower
    block first on ties), so only k * _CANDIDATE_BLOCK tokens are ranked while that is
    well under the row; past that, the whole row's order keys are ranked.
    """
    rows, width = x.shape
    k = min(k, width)
    if k * _CANDIDATE_BLOCK * 2 < width:
        blocks = -(-width // _CANDIDATE_BLOCK)
        whole = (width // _CANDIDATE_BLOCK) * _CANDIDATE_BLOCK
        block_max = x[:, :whole].reshape(rows, whole // _CANDIDATE_BLOCK, -1).amax(-1)
        if whole < width:
            block_max = torch.cat([block_max, x[:, whole:].amax(-1, keepdim=True)], 1)
        block_ids = torch.arange(blocks, device=x.device)
        best = order_keys(block_max, block_ids, blocks).topk(k, -1, sorted=False).indices
        offsets = torch.arange(_CANDIDATE_BLOCK, device=x.device)
        index = (best[:, :, None] * _CANDIDATE_BLOCK + offsets).reshape(rows, -1)
        outside = index >= width  # the short last block's missing columns
        index = index.clamp(max=width - 1)
        keys = order_keys(x.gather(1, index), index, width)
        keys.masked_fill_(outside, torch.iinfo(torch.int64).min)
    else:
        keys = order_keys(x, torch.arange(width, device=x.device), width)
    if k * 8 >= width:  # most of the row: one sort is cheaper than topk
        top = keys.sort(-1, descending=True).values[:, :k]
    else:
        top = keys.topk(k, -1, sorted=True).values
    token_ids = (width - 1) - (top & 0xFFFFFFFF)
    return x.gather(1, token_ids), token_ids
