"""Probabilities without a softmax: unnormalized exp2 masses, and the inverse-CDF draw
over a whole row, block by block.

exp2 is about 3x faster than exp on a CPU, so a row's probabilities are
``2**((x - max) * log2(e) / T)``, never normalized: a draw scales its uniform number by
the total instead. torch's CPU cumsum over a whole row is a scalar loop, so the draw
takes two short running sums (over blocks, then inside one) instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from worker_svc.sampling.tensors import Workspace, at

LOG2E = 1.0 / math.log(2.0)
NEG_INF = float("-inf")
# The smallest normal float32: ``z > -_TINY`` is ``z >= 0`` for any difference of floats.
_TINY = torch.finfo(torch.float32).tiny
# The inverse CDF reduces a row block by block (a blocked sum is vectorized).
_CDF_BLOCK = 128


def row_maxima(x: torch.Tensor) -> torch.Tensor:
    """amax per row as a column; a row of -inf gets 0 so that x - max stays -inf, not NaN."""
    return torch.nan_to_num(x.amax(-1, keepdim=True), neginf=0.0)


def below(u: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """u * total as float32, kept strictly below total (so the draw lands on a token)."""
    target = (u * total.double()).float()
    return torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))


def mask_below(y: torch.Tensor, threshold: torch.Tensor, work: Workspace | None) -> None:
    """Set ``y < threshold`` (per row, finite) to -inf in place; kept values stay bit-exact.

    A boolean mask costs ~15x more than these three vectorized passes on a CPU: kept
    entries get ``z = y - threshold >= 0`` (exact in sign), dropped ones ``z = -inf``,
    and ``min(y, z)`` is ``y`` where kept since ``y <= 0 <= z``.
    """
    z = torch.empty_like(y) if work is None else work.like("cut", y)
    torch.sub(y, threshold, out=z)
    F.threshold_(z, -_TINY, NEG_INF)
    torch.minimum(y, z, out=y)


def block_masses(
    x: torch.Tensor,
    top: torch.Tensor,
    scale: torch.Tensor,
    log2_min_p: torch.Tensor | None,
    work: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalized probabilities ``2**((x - top) * scale)`` and their per-block sums.

    ``scale`` is log2(e) / temperature, so these are softmax(x / T) up to a factor (exp2
    is ~3x faster than exp on a CPU). Entries under the min-p threshold are zero. The
    buffer is padded with zeros to whole _CDF_BLOCKs.
    """
    rows, width = x.shape
    blocks = -(-width // _CDF_BLOCK)
    if work is None:
        y = torch.empty((rows, blocks * _CDF_BLOCK), dtype=torch.float32, device=x.device)
    else:
        y = work.get("mass", rows, blocks * _CDF_BLOCK, torch.float32, x.device)
    if y.shape[1] > width:
        y[:, width:] = NEG_INF
    torch.sub(x, top, out=y[:, :width])
    y.mul_(scale)
    if log2_min_p is not None:
        mask_below(y, log2_min_p, work)
    y.exp2_()
    return y, y.view(rows, blocks, _CDF_BLOCK).sum(-1)


def draw_from_blocks(mass: torch.Tensor, block_mass: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw in token-id order: first the block, then the token inside it.

    Two short running sums instead of one over the row (torch's CPU cumsum is a scalar
    loop). Only tokens of positive mass can be drawn: the guards choose the heaviest
    block / token where rounding of a parallel running sum (GPU) would pick an empty one.
    """
    rows, blocks = block_mass.shape
    cdf = block_mass.cumsum(-1)
    target = below(u, cdf[:, -1])
    block = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    block.clamp_(max=blocks - 1)
    block = torch.where(at(block_mass, block) > 0, block, block_mass.argmax(-1))
    before = at(cdf, (block - 1).clamp(min=0))
    before = torch.where(block > 0, before, torch.zeros_like(before))
    inside = mass.view(rows, blocks, _CDF_BLOCK)
    inside = inside.gather(1, block[:, None, None].expand(rows, 1, _CDF_BLOCK)).squeeze(1)
    local = inside.cumsum(-1)
    rest = torch.minimum(
        (target - before).clamp(min=0.0),
        torch.nextafter(local[:, -1], torch.zeros_like(before)),
    )
    pick = torch.searchsorted(local, rest[:, None], right=True).squeeze(1)
    pick.clamp_(max=_CDF_BLOCK - 1)
    pick = torch.where(at(inside, pick) > 0, pick, inside.argmax(-1))
    return block * _CDF_BLOCK + pick
