"""The definitions the sampler is checked against, and the statistics that check it.

Distributions are checked with a chi-square test over many seeded draws, everything else
against the same quantity computed directly (log_softmax, argmax, the penalty formulas,
transformers' repetition penalty). All randomness is seeded, so every run draws the same.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from pagoda.sampling_params import SamplingParams
from worker_svc.sampling import Sampler

# A correct sampler passes every chi-square test of these tests at this level with the
# fixed seeds; a wrong temperature, an off-by-one filter or a biased draw fails it by a
# wide margin.
ALPHA = 1e-3
EOS = [2, 7]


@dataclass
class Row:
    params: SamplingParams
    seed: int = 0
    sample_index: int = 0
    token_ids: list[int] = field(default_factory=lambda: [5, 6, 9])
    num_prompt_tokens: int = 3


# ------------------------------------------------------------------------- statistics


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X ~ chi-square(dof): the regularized upper incomplete gamma Q(k/2, x/2)."""
    if x <= 0:
        return 1.0
    a, h = dof / 2.0, x / 2.0
    log_front = -h + a * math.log(h) - math.lgamma(a)
    if h < a + 1.0:  # series for the lower function P
        term = total = 1.0 / a
        n = a
        while term > total * 1e-16:
            n += 1.0
            term *= h / n
            total += term
        return max(0.0, 1.0 - total * math.exp(log_front))
    # Continued fraction for Q (modified Lentz).
    tiny = 1e-300
    b = h + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    result = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        step = d * c
        result *= step
        if abs(step - 1.0) < 1e-16:
            break
    return result * math.exp(log_front)


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed counts against probabilities; bins expecting < 5 are pooled."""
    n = int(counts.sum())
    expected = probs.double() * n
    big = expected >= 5
    obs = counts[big].double().tolist()
    exp = expected[big].tolist()
    if (~big).any() and float(expected[~big].sum()) > 0:
        obs.append(float(counts[~big].sum()))
        exp.append(float(expected[~big].sum()))
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp, strict=True))
    return chi2_sf(stat, len(obs) - 1)


def reference_probs(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> torch.Tensor:
    """The filtered distribution by its definition, in float64.

    softmax(logits / T); min-p keeps p >= min_p * max p; top-k keeps the k best (higher
    logit first, then lower id); top-p keeps, of what is left and renormalized, the
    shortest best-first prefix whose mass reaches top_p. Asserts that no token sits so
    close to a cut that float32 rounding could move it.
    """
    x = logits.double()
    p = torch.softmax(x / temperature, 0)
    order = sorted(range(x.shape[0]), key=lambda i: (-float(x[i]), i))
    keep = order
    if min_p:
        ratio = p / p.max()
        assert not ((ratio - min_p).abs() < 1e-4).any(), "a token sits on the min-p cut"
        keep = [i for i in keep if ratio[i] >= min_p]
    if top_k:
        keep = keep[:top_k]
    if top_p < 1.0:
        mass = p[keep] / p[keep].sum()
        before = torch.cumsum(mass, 0) - mass
        assert not ((before - top_p).abs() < 1e-4).any(), "a token sits on the top-p cut"
        keep = [i for i, b in zip(keep, before.tolist(), strict=True) if b < top_p]
    q = torch.zeros_like(p)
    q[keep] = p[keep] / p[keep].sum()
    return q


def draw_many(
    sampler: Sampler,
    logits: torch.Tensor,
    params: SamplingParams,
    n: int,
    chunk: int = 20_000,
    salt: int = 0,
) -> torch.Tensor:
    """Tokens of n rows with the same logits and different (seed, sample index, position)."""
    rng = random.Random(1234 + salt)
    tokens: list[int] = []
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        rows = [
            Row(
                params,
                seed=rng.getrandbits(64),
                sample_index=rng.randrange(4),
                token_ids=[0] * rng.randrange(1, 40),
                num_prompt_tokens=1,
            )
            for _ in range(size)
        ]
        tokens += sampler(logits.expand(size, -1), rows).token_ids
    return torch.tensor(tokens)


def small_logits(vocab: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g) * 1.5


def reference_top(x: torch.Tensor, k: int) -> list[list[int]]:
    return [sorted(range(x.shape[1]), key=lambda j: (-float(r[j]), j))[:k] for r in x]


def reference_processed(
    logits: torch.Tensor, token_ids: list[int], num_prompt: int, params: SamplingParams, vocab: int
) -> torch.Tensor:
    """bias, then repetition over prompt + output, then frequency and presence over output."""
    x = logits.double().clone()
    for t, b in params.logit_bias.items():
        if t < vocab:
            x[t] += b
    for t in set(token_ids):
        r = params.repetition_penalty
        x[t] = x[t] / r if x[t] > 0 else x[t] * r
    generated = token_ids[num_prompt:]
    for t in set(generated):
        x[t] -= params.frequency_penalty * generated.count(t) + params.presence_penalty
    return x
