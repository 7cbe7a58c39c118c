"""The draw of every sampled row: temperature and min-p over the whole row, or top-k and
top-p over the row's best tokens.

Each row's token is an inverse-CDF draw of its uniform number over its filtered
distribution, in vLLM's order: min-p, top-k, top-p. Rows without top-k/top-p draw
through per-block masses in token-id order (``masses``); the others through a few
ranked candidates, best first (``ranking``). Both give the same distribution; the split
only decides what each row costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from worker_svc.sampling.masses import below, block_masses, draw_from_blocks, row_maxima
from worker_svc.sampling.plan import NO_CUT, Plan, SamplingRow
from worker_svc.sampling.randomness import row_uniforms
from worker_svc.sampling.ranking import top_candidates
from worker_svc.sampling.tensors import Workspace, at, floats, ints

# Candidates gathered first for a top-p row; a row whose nucleus is wider gets
# _CANDIDATE_GROWTH times more, then its whole row ranked.
_FIRST_CANDIDATES = 64
_CANDIDATE_GROWTH = 16


def sample(
    x: torch.Tensor, rows: Sequence[SamplingRow], plans: list[Plan], work: Workspace
) -> torch.Tensor:
    """Draws one token per row of processed logits ``x`` (every row samples)."""
    device = x.device
    u = row_uniforms(rows, device)
    scale = floats([plan.scale for plan in plans], device)[:, None]
    full = [i for i, plan in enumerate(plans) if not plan.top_k and plan.top_p >= 1.0]
    if len(full) == len(plans):
        return sample_full(x, plans, scale, u, work)
    if not full:
        return sample_ranked(x, plans, scale, u, work)
    skip = set(full)
    ranked = [i for i in range(len(plans)) if i not in skip]
    tokens = torch.empty(len(plans), dtype=torch.int64, device=device)
    for group, method in ((full, sample_full), (ranked, sample_ranked)):
        index = ints(group, device)
        part = work.rows("group", x, group)
        tokens[index] = method(part, [plans[i] for i in group], scale[index], u[index], work)
    return tokens


def sample_full(
    x: torch.Tensor, plans: list[Plan], scale: torch.Tensor, u: torch.Tensor, work: Workspace
) -> torch.Tensor:
    """Rows without top-k/top-p: temperature and min-p over the whole row."""
    _, log2_min_p = _min_p_cuts(plans, x.device)
    mass, block_mass = block_masses(x, row_maxima(x), scale, log2_min_p, work)
    return draw_from_blocks(mass, block_mass, u)


def sample_ranked(
    x: torch.Tensor, plans: list[Plan], scale: torch.Tensor, u: torch.Tensor, work: Workspace
) -> torch.Tensor:
    """Rows with top-k and/or top-p: a draw over the best tokens, best first.

    min-p and top-k cut the ranked list at a count; top-p then keeps the shortest
    prefix whose mass reaches top_p of what is left (vLLM's order: min-p, top-k,
    top-p). A top-p row without top-k needs the mass of its whole row (one pass as
    in sample_full) and, when its nucleus is wider than the candidates gathered,
    another round with more of them; the answer is the same either way.
    """
    rows, width = x.shape
    filters = _Filters.of(x, plans, scale, u, work)
    nucleus = any(plan.nucleus for plan in plans)
    k = min(width, max([_FIRST_CANDIDATES] + [plan.top_k for plan in plans]))
    tokens = torch.empty(rows, dtype=torch.int64, device=x.device)
    todo = torch.arange(rows, device=x.device)
    part = x
    while True:
        f = filters.at(todo)
        ranked = _Ranked.of(part, k, f)
        tokens[todo] = ranked.draw(f.u)
        if k >= width or not nucleus:
            return tokens
        wider = ranked.wider(f, k)
        if wider is None:
            return tokens
        k = _more_candidates(ranked, wider, k, width)
        todo = todo[wider]
        part = x.index_select(0, todo)


def _min_p_cuts(plans: list[Plan], device: torch.device) -> tuple[list[float], torch.Tensor | None]:
    """log2(min_p) per row (NO_CUT without min-p), as a column; None when no row cuts."""
    values = [plan.log2_min_p for plan in plans]
    if all(v == NO_CUT for v in values):
        return values, None
    return values, floats(values, device)[:, None]


@dataclass(frozen=True)
class _Filters:
    """The parameters of ranked rows, one entry per row (``at`` selects rows of them)."""

    scale: torch.Tensor  # [R, 1] log2(e) / temperature
    u: torch.Tensor  # [R] the uniform number of the row's draw
    top_k: torch.Tensor  # [R] int64; 0: no top-k
    has_k: torch.Tensor
    top_p: torch.Tensor  # [R] float32; 1.0: no top-p
    has_p: torch.Tensor
    min_p_cut: torch.Tensor  # [R] log2(min_p); NO_CUT: no min-p
    whole: torch.Tensor  # [R] the mass of a top-p row without top-k over its whole row

    @classmethod
    def of(
        cls,
        x: torch.Tensor,
        plans: list[Plan],
        scale: torch.Tensor,
        u: torch.Tensor,
        work: Workspace,
    ) -> _Filters:
        device = x.device
        top_k = ints([plan.top_k for plan in plans], device)
        top_p = floats([plan.top_p for plan in plans], device)
        min_p_values, log2_min_p = _min_p_cuts(plans, device)
        min_p_cut = floats(min_p_values, device)
        whole = _whole_masses(x, plans, scale, log2_min_p, work)
        return cls(scale, u, top_k, top_k > 0, top_p, top_p < 1.0, min_p_cut, whole)

    def at(self, todo: torch.Tensor) -> _Filters:
        return _Filters(*(getattr(self, f.name)[todo] for f in fields(self)))


def _whole_masses(
    x: torch.Tensor,
    plans: list[Plan],
    scale: torch.Tensor,
    log2_min_p: torch.Tensor | None,
    work: Workspace,
) -> torch.Tensor:
    """Per row, the mass that a top-p row without top-k takes its share of: that of its
    whole row after min-p (0 for the other rows, whose share is of their top-k)."""
    rows = x.shape[0]
    whole = torch.zeros(rows, dtype=torch.float32, device=x.device)
    nucleus = [i for i, plan in enumerate(plans) if plan.nucleus]
    if nucleus:
        index = ints(nucleus, x.device)
        part = work.rows("nucleus", x, nucleus)
        cut = None if log2_min_p is None else log2_min_p[index]
        _, block_mass = block_masses(part, row_maxima(part), scale[index], cut, work)
        whole[index] = block_mass.cumsum(-1)[:, -1]
    return whole


@dataclass(frozen=True)
class _Ranked:
    """One round: the k best candidates of each row still to draw, and where each cut
    falls among them."""

    ids: torch.Tensor  # [n, k] token ids, best first
    mass: torch.Tensor  # [n, k] their unnormalized probabilities
    cdf: torch.Tensor  # [n, k] the running sum of mass
    kept_min_p: torch.Tensor  # [n] candidates min-p keeps
    nucleus_mass: torch.Tensor  # [n] the mass top-p keeps
    under: torch.Tensor  # [n] candidates whose running sum is under nucleus_mass
    kept: torch.Tensor  # [n] candidates all the filters keep (at least 1)

    @classmethod
    def of(cls, x: torch.Tensor, k: int, f: _Filters) -> _Ranked:
        values, ids = top_candidates(x, k)
        y = (values - torch.nan_to_num(values[:, :1], neginf=0.0)) * f.scale
        mass = torch.exp2(y)
        cdf = mass.cumsum(-1)
        kept_min_p = (y >= f.min_p_cut[:, None]).sum(-1)
        kept = torch.minimum(torch.where(f.has_k, f.top_k, k), kept_min_p)
        kept.clamp_(min=1)  # the best token always stays (0 only for a row of -inf)
        total = torch.where(f.has_k, at(cdf, kept - 1), f.whole)
        nucleus_mass = f.top_p * total
        under = torch.searchsorted(cdf, nucleus_mass[:, None]).squeeze(1)
        kept = torch.where(f.has_p, torch.minimum(under + 1, kept), kept)
        return cls(ids, mass, cdf, kept_min_p, nucleus_mass, under, kept)

    def draw(self, u: torch.Tensor) -> torch.Tensor:
        """The token at ``u`` of each row's kept mass; one of zero mass (a rounding past
        the kept prefix's end) gives way to the best candidate."""
        target = below(u, at(self.cdf, self.kept - 1))
        pick = torch.searchsorted(self.cdf, target[:, None], right=True).squeeze(1)
        pick = torch.minimum(pick, self.kept - 1)
        pick = torch.where(at(self.mass, pick) > 0, pick, 0)
        return at(self.ids, pick)

    def wider(self, f: _Filters, k: int) -> torch.Tensor | None:
        """The rows whose nucleus is wider than the candidates (None when none is): only
        top-p rows without top-k, whose min-p cut (if any) is not within the candidates
        either."""
        wider = f.has_p & ~f.has_k & (self.kept_min_p >= k) & (self.under >= k)
        return wider if bool(wider.any()) else None


def _more_candidates(ranked: _Ranked, wider: torch.Tensor, k: int, width: int) -> int:
    """How many candidates the next round gathers for the wider rows.

    Each token past the candidates weighs at most as much as the last of them: where
    even the grown number of such tokens cannot reach the nucleus, rank the whole row.
    """
    grow = k * _CANDIDATE_GROWTH
    reach = ranked.cdf[:, -1] + (grow - k) * ranked.mass[:, -1]
    if grow * 8 >= width or bool((reach < ranked.nucleus_mass)[wider].all()):
        grow = width
    return grow
