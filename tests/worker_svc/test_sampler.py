"""The batched sampler against the definitions it implements.

Distributions are checked with a chi-square test over many seeded draws, everything else
against the same quantity computed directly (log_softmax, argmax, the penalty formulas,
transformers' repetition penalty). All randomness is seeded, so every run draws the same.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

import worker_svc.sampler as sampler_module
from pagoda.sampling_params import SamplingParams
from worker_svc.sampler import (
    Sampler,
    _argmax,
    _top_candidates,
    counter_uniforms,
    prompt_logprobs,
)

# A correct sampler passes every chi-square test below at this level with the fixed seeds;
# a wrong temperature, an off-by-one filter or a biased draw fails it by a wide margin.
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


def test_chi2_sf_matches_closed_forms():
    for x in (0.1, 1.0, 3.84, 10.0, 40.0, 150.0):
        # odd dof 1: erfc(sqrt(x / 2)); even dof 2m: exp(-x/2) * sum_{i<m} (x/2)^i / i!
        assert chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9, abs=1e-300)
        for m in (1, 2, 5, 20, 60):
            want = math.exp(-x / 2) * sum((x / 2) ** i / math.factorial(i) for i in range(m))
            assert chi2_sf(x, 2 * m) == pytest.approx(want, rel=1e-9, abs=1e-300)
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)


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


STAT_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.5),
    dict(temperature=2.0, top_k=10),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=1.3, min_p=0.05),
    dict(temperature=1.0, top_k=12, top_p=0.9),
    dict(temperature=0.9, min_p=0.02, top_p=0.85),
    dict(temperature=0.8, top_k=20, min_p=0.1, top_p=0.95),
    dict(temperature=1.0, top_k=1),
    dict(temperature=1.0, top_k=30, min_p=0.1),
]


@pytest.mark.parametrize(
    "case", STAT_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
def test_draws_follow_the_filtered_softmax(case):
    logits = small_logits()
    want = reference_probs(
        logits,
        case["temperature"],
        case.get("top_k", 0),
        case.get("top_p", 1.0),
        case.get("min_p", 0.0),
    )
    sampler = Sampler(logits.shape[0], EOS)
    tokens = draw_many(sampler, logits[None], SamplingParams(**case), 20_000)
    counts = torch.bincount(tokens, minlength=logits.shape[0])
    assert counts[want == 0].sum() == 0, "a filtered-out token was drawn"
    assert chi_square_p(counts, want) > ALPHA
    if (want > 0).sum() > 1:  # the test tells a temperature 20% off
        wrong = reference_probs(
            logits, case["temperature"] * 1.2, case.get("top_k", 0), case.get("top_p", 1.0)
        )
        assert chi_square_p(counts, wrong) < 1e-6


def test_draws_over_a_large_vocabulary_follow_the_filtered_softmax():
    """Large rows take the blocked paths: per-block masses, candidate blocks, a nucleus
    wider than the first candidates (a second round), and bf16 logits."""
    vocab = 5000
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(vocab, generator=g) - 4.0
    heads = torch.randperm(vocab, generator=g)[:150]
    logits[heads] = torch.randn(150, generator=g) * 0.4 + 3.0
    logits = logits.bfloat16().float()  # the bf16 grid, with its ties
    sampler = Sampler(vocab, EOS)
    for i, case in enumerate(
        [
            dict(temperature=1.0),
            dict(temperature=0.7, min_p=0.05),
            dict(top_k=40),
            dict(top_p=0.7),
            dict(top_p=0.9, min_p=0.01),
        ]
    ):
        want = reference_probs(
            logits,
            case.get("temperature", 1.0),
            case.get("top_k", 0),
            case.get("top_p", 1.0),
            case.get("min_p", 0.0),
        )
        tokens = draw_many(
            sampler, logits[None].bfloat16(), SamplingParams(**case), 4000, chunk=2000, salt=i
        )
        counts = torch.bincount(tokens, minlength=vocab)
        assert counts[want == 0].sum() == 0, case
        assert chi_square_p(counts, want) > ALPHA, case


def test_penalties_and_bias_shape_the_distribution():
    logits = small_logits(seed=5)
    history = [3, 3, 3, 11, 17, 17, 30, 4, 4, 40]
    params = SamplingParams(
        temperature=1.0,
        repetition_penalty=1.7,
        frequency_penalty=0.4,
        presence_penalty=0.6,
        logit_bias={3: 1.5, 20: -3.0},
    )
    want = reference_probs(reference_processed(logits, history, 4, params, 48), 1.0)
    rng = random.Random(9)
    rows = [
        Row(params, rng.getrandbits(64), rng.randrange(4), list(history), 4) for _ in range(20_000)
    ]
    tokens = torch.tensor(Sampler(48, EOS)(logits.expand(len(rows), -1), rows).token_ids)
    counts = torch.bincount(tokens, minlength=48)
    assert chi_square_p(counts, want) > ALPHA
    assert chi_square_p(counts, reference_probs(logits, 1.0)) < 1e-9  # the penalties matter


# ------------------------------------------------------------------------- randomness

_G, _M1, _M2, _MASK = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 2**64 - 1


def splitmix64(state: int):
    """The reference SplitMix64 generator, in Python integers."""
    while True:
        state = (state + _G) & _MASK
        z = state
        z = ((z ^ (z >> 30)) * _M1) & _MASK
        z = ((z ^ (z >> 27)) * _M2) & _MASK
        yield z ^ (z >> 31)


def reference_uniform(seed: int, sample_index: int, position: int) -> float:
    keys = splitmix64(seed & _MASK)
    for _ in range(sample_index + 1):
        key = next(keys)
    outputs = splitmix64(key)
    for _ in range(position + 1):
        bits = next(outputs)
    return (bits >> 11) * 2.0**-53


def test_reference_generator_is_splitmix64():
    outputs = splitmix64(0)
    assert [next(outputs) for _ in range(3)] == [
        0xE220A8397B1DCDAF,
        0x6E789E6AA1B965F4,
        0x06C45D188009454F,
    ]


def test_counter_uniforms_are_the_documented_function():
    rng = random.Random(5)
    cases = [(0, 0, 0), (2**64 - 1, 3, 17), (2**63, 0, 5), (12345, 7, 0)]
    cases += [(rng.getrandbits(64), rng.randrange(8), rng.randrange(60)) for _ in range(40)]
    signed = [s - 2**64 if s >= 2**63 else s for s, _, _ in cases]
    got = counter_uniforms(
        torch.tensor(signed),
        torch.tensor([i for _, i, _ in cases]),
        torch.tensor([p for _, _, p in cases]),
    )
    assert got.dtype == torch.float64
    assert got.tolist() == [reference_uniform(*c) for c in cases]


def test_uniforms_are_uniform_and_independent_across_index_position_and_seed():
    n = 20_000
    seeds = torch.arange(n, dtype=torch.int64) * 7919 + 11
    zero = torch.zeros(n, dtype=torch.int64)
    base = counter_uniforms(seeds, zero, zero + 5)
    others = {
        "sample index": counter_uniforms(seeds, zero + 1, zero + 5),
        "position": counter_uniforms(seeds, zero, zero + 6),
        "seed": counter_uniforms(seeds + 1, zero, zero + 5),
    }
    bins = 20
    flat = torch.full((bins,), 1.0 / bins)
    assert chi_square_p(torch.bincount((base * bins).long(), minlength=bins), flat) > ALPHA
    for name, u in others.items():
        cells = (base * 10).long() * 10 + (u * 10).long()  # a 10 x 10 joint histogram
        counts = torch.bincount(cells, minlength=100)
        assert chi_square_p(counts, torch.full((100,), 0.01)) > ALPHA, name


def test_token_draws_are_independent_across_samples_and_positions():
    """Two tokens of equal probability: the pair (sample 0, sample 1) and the pair
    (position p, p + 1) of the same seed are uniform over the four outcomes."""
    sampler = Sampler(2, [])
    params = SamplingParams(temperature=1.0)
    logits = torch.zeros(1, 2)
    n = 8000
    rows = lambda index, length: [  # noqa: E731
        Row(params, seed=s * 104729, sample_index=index, token_ids=[1] * length) for s in range(n)
    ]
    first = torch.tensor(sampler(logits.expand(n, -1), rows(0, 3)).token_ids)
    sibling = torch.tensor(sampler(logits.expand(n, -1), rows(1, 3)).token_ids)
    later = torch.tensor(sampler(logits.expand(n, -1), rows(0, 4)).token_ids)
    for other in (sibling, later):
        counts = torch.bincount(first * 2 + other, minlength=4)
        assert chi_square_p(counts, torch.full((4,), 0.25)) > ALPHA


# ---------------------------------------------------------------- batch independence


def varied_rows(vocab: int, rng: random.Random) -> list[Row]:
    """Rows of every kind, to surround the row under test."""
    kinds = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.2),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=1.0, top_k=1000),
        SamplingParams(temperature=1.2, top_p=0.5),
        SamplingParams(temperature=1.0, min_p=0.1, top_p=0.9),
        SamplingParams(frequency_penalty=1.0, presence_penalty=-0.5, logit_bias={1: 5.0}),
        SamplingParams(min_tokens=4, stop_token_ids=[3]),
    ]
    return [
        Row(
            p,
            seed=rng.getrandbits(64),
            sample_index=rng.randrange(3),
            token_ids=[rng.randrange(vocab) for _ in range(rng.randrange(2, 30))],
            num_prompt_tokens=1,
        )
        for p in kinds
    ]


SUBJECTS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6, min_p=0.02),
    SamplingParams(temperature=1.0, top_k=40),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=1.5, top_p=0.95, min_p=0.001),
    SamplingParams(temperature=1.0, top_k=50, top_p=0.8, repetition_penalty=1.3),
    SamplingParams(temperature=1.0, frequency_penalty=0.5, logit_bias={10: 2.0}, logprobs=2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_token_does_not_depend_on_the_rest_of_the_batch(dtype):
    vocab = 12_000
    rng = random.Random(8)
    g = torch.Generator().manual_seed(8)
    for params in SUBJECTS:
        for _ in range(2):
            subject = Row(
                params,
                seed=rng.getrandbits(64),
                sample_index=rng.randrange(4),
                token_ids=[rng.randrange(vocab) for _ in range(20)],
                num_prompt_tokens=10,
            )
            row_logits = (torch.randn(1, vocab, generator=g) * 2.5).to(dtype)
            alone = Sampler(vocab, EOS)(row_logits, [subject])
            others = varied_rows(vocab, rng)
            other_logits = (torch.randn(len(others), vocab, generator=g) * 2.5).to(dtype)
            batch = [subject] + others
            logits = torch.cat([row_logits, other_logits])
            mixes = [
                (list(range(len(batch))), 0),
                (list(range(len(batch)))[::-1], len(batch) - 1),
                ([1, 2, 0, 4], 2),
                ([5, 0, 0, 7], 1),  # the row twice
            ]
            for order, at in mixes:
                out = Sampler(vocab, EOS)(logits[order], [batch[i] for i in order])
                assert out.token_ids[at] == alone.token_ids[0], (params, order)
                assert out.logprobs[at] == alone.logprobs[0]


def test_candidate_rounds_do_not_change_the_result(monkeypatch):
    """Fewer first candidates (more rounds) or other block widths: the same tokens."""
    vocab = 9000
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(64, vocab, generator=g) * torch.linspace(0.3, 4.0, 64)[:, None]
    rng = random.Random(2)
    params = [
        SamplingParams(top_p=0.9),
        SamplingParams(top_p=0.6, min_p=0.01),
        SamplingParams(top_k=30, top_p=0.95),
        SamplingParams(top_k=7),
    ]
    rows = [Row(params[i % 4], seed=rng.getrandbits(64)) for i in range(64)]
    want = Sampler(vocab, EOS)(logits, rows).token_ids
    for first, block in [(4, 32), (16, 8), (2048, 32), (64, 64)]:
        monkeypatch.setattr(sampler_module, "_FIRST_CANDIDATES", first)
        monkeypatch.setattr(sampler_module, "_CANDIDATE_BLOCK", block)
        assert Sampler(vocab, EOS)(logits, rows).token_ids == want, (first, block)


def test_a_fresh_sampler_draws_the_same():
    """Resuming elsewhere: no state of the sampler changes a draw."""
    vocab = 1000
    logits = torch.randn(4, vocab)
    rows = [Row(SamplingParams(top_p=0.9), seed=99, sample_index=i) for i in range(4)]
    first = Sampler(vocab, EOS)
    assert first(logits, rows).token_ids == first(logits, rows).token_ids
    assert Sampler(vocab, EOS)(logits, rows).token_ids == first(logits, rows).token_ids


# ---------------------------------------------------------------- ranking primitives


def reference_top(x: torch.Tensor, k: int) -> list[list[int]]:
    return [sorted(range(x.shape[1]), key=lambda j: (-float(r[j]), j))[:k] for r in x]


@pytest.mark.parametrize("k", [1, 5, 64, 300, 2999])
def test_top_candidates_are_the_best_tokens_ties_by_lower_id(k):
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(6, 3000, generator=g) * 2).bfloat16().float()  # many exact ties
    x[1] = 1.0  # one value throughout
    x[2, 100:140] = 50.0  # a tie run across blocks
    x[3, -3:] = 60.0  # the best tokens in the short last block
    x[4, ::2] = float("-inf")
    x[5, 17] = -0.0
    x[5, 3] = 0.0
    values, ids = _top_candidates(x, k)
    assert ids.tolist() == reference_top(x, k)
    assert torch.equal(values, x.gather(1, ids))


def test_argmax_is_torch_argmax_including_ties_and_ragged_widths():
    g = torch.Generator().manual_seed(0)
    for width in (7, 512, 513, 1000, 32_000, 49_157):
        x = torch.randn(5, width, generator=g).bfloat16().float()
        x[1] = 0.0
        x[2, width // 3] = x[2, width - 1] = 100.0
        x[3, -1] = 100.0
        assert torch.equal(_argmax(x), x.argmax(-1)), width


# ------------------------------------------------------------------ logits processing


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


def test_penalties_and_bias_match_their_definitions():
    vocab = 300
    rng = random.Random(4)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, vocab + 20, generator=g) * 3
    logits[:, vocab:] = 1000.0  # padding columns are not tokens
    original = logits.clone()
    params = [
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=0.7),
        SamplingParams(presence_penalty=-1.5, frequency_penalty=-0.3),
        SamplingParams(logit_bias={0: 100.0, 5: -7.5, vocab + 3: 9.0}, repetition_penalty=1.2),
        SamplingParams(temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0),
        SamplingParams(),
    ]
    rows = []
    for p in params:
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 50))]
        output = [rng.choice(prompt + [rng.randrange(vocab)]) for _ in range(rng.randrange(0, 30))]
        rows.append(Row(p, token_ids=prompt + output, num_prompt_tokens=len(prompt)))
    sampler = Sampler(vocab, EOS)
    got = sampler.processed_logits(logits, rows)
    assert got.shape == (6, vocab) and got.dtype == torch.float32
    for i, row in enumerate(rows):
        want = reference_processed(
            logits[i, :vocab], row.token_ids, row.num_prompt_tokens, row.params, vocab
        )
        torch.testing.assert_close(got[i].double(), want, rtol=1e-6, atol=1e-5)
    assert torch.equal(logits, original), "the caller's logits were changed"
    # The cached token histories follow the rows as they grow.
    for row in rows:
        row.token_ids.append(rng.randrange(vocab))
    got = sampler.processed_logits(logits, rows)
    for i, row in enumerate(rows):
        want = reference_processed(
            logits[i, :vocab], row.token_ids, row.num_prompt_tokens, row.params, vocab
        )
        torch.testing.assert_close(got[i].double(), want, rtol=1e-6, atol=1e-5)
    # A list replaced (a resumed sequence) or rewritten in place is read again.
    rows[0].token_ids = [rng.randrange(vocab) for _ in range(60)]
    old = rows[1].token_ids
    rewritten = [rng.randrange(vocab) for _ in range(len(old) + 1)]
    rewritten[len(old) - 1] = (old[-1] + 1) % vocab
    old[:] = rewritten
    got = sampler.processed_logits(logits, rows)
    for i, row in enumerate(rows):
        want = reference_processed(
            logits[i, :vocab], row.token_ids, row.num_prompt_tokens, row.params, vocab
        )
        torch.testing.assert_close(got[i].double(), want, rtol=1e-6, atol=1e-5)
    # Greedy picks the argmax of the processed logits.
    assert sampler(logits, rows).token_ids[4] == int(got[4].argmax())


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    vocab = 500
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, vocab, generator=g) * 4
    token_ids = torch.randint(0, vocab, (120,), generator=g).tolist()
    row = Row(SamplingParams(repetition_penalty=penalty), token_ids=token_ids, num_prompt_tokens=80)
    got = Sampler(vocab, EOS).processed_logits(logits, [row])
    hf = RepetitionPenaltyLogitsProcessor(penalty=penalty)(
        torch.tensor([token_ids]), logits.clone()
    )
    assert torch.equal(got, hf)


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    vocab = 64
    logits = torch.zeros(1, vocab)
    logits[0, EOS] = 8.0
    logits[0, 40] = 7.5  # a stop id
    logits[0, 12] = 1.0
    sampler = Sampler(vocab, EOS)
    rng = random.Random(0)
    for temperature in (0.0, 1.0):
        for ignore_eos in (False, True):
            params = SamplingParams(
                temperature=temperature, min_tokens=3, stop_token_ids=[40], ignore_eos=ignore_eos
            )
            for generated in range(5):
                rows = [
                    Row(
                        params,
                        seed=rng.getrandbits(64),
                        token_ids=[1] * (4 + generated),
                        num_prompt_tokens=4,
                    )
                    for _ in range(400)
                ]
                tokens = set(sampler(logits.expand(len(rows), -1), rows).token_ids)
                masked = set() if generated >= 3 else {40} | (set() if ignore_eos else set(EOS))
                assert not tokens & masked, (temperature, ignore_eos, generated)
                if temperature == 0.0:
                    assert tokens == ({12} if masked == {40} | set(EOS) else {2})


def test_greedy_is_the_argmax_of_the_real_vocabulary():
    vocab = 32_000
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(8, vocab + 128, generator=g) * 3
    logits[:, vocab:] = 1e4  # padded LM head columns
    logits[3, 10] = logits[3, 20] = 50.0  # a tie: the lower id wins
    rows = [Row(SamplingParams(temperature=0.0)) for _ in range(8)]
    rows[5] = Row(SamplingParams(temperature=1e-6))  # below GREEDY_TEMPERATURE
    want = logits[:, :vocab].argmax(-1).tolist()
    sampler = Sampler(vocab, EOS)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        lg = logits.to(dtype)
        assert sampler(lg, rows).token_ids == lg[:, :vocab].float().argmax(-1).tolist()
    assert sampler(logits, rows).token_ids == want
    assert want[3] == 10
    # The same greedy rows in a batch that also samples (the general path).
    mixed = rows + [Row(SamplingParams(temperature=1.0, top_k=3))]
    extra = torch.cat([logits, logits[:1]])
    assert sampler(extra, mixed).token_ids[:8] == want


def test_a_row_with_every_token_masked_still_gets_a_token():
    """min_tokens over a vocabulary of stop tokens only: no error, whatever the path."""
    sampler = Sampler(3, [0, 1, 2])
    kinds = [
        {},
        dict(top_k=2),
        dict(top_p=0.5),
        dict(min_p=0.5, top_p=0.5),
        dict(temperature=0.0),
        dict(logprobs=2),
    ]
    rows = [Row(SamplingParams(min_tokens=5, **kw), seed=i) for i, kw in enumerate(kinds)]
    out = sampler(torch.zeros(len(rows), 3), rows)
    assert all(0 <= t < 3 for t in out.token_ids)


def test_an_empty_step_and_bad_shapes():
    sampler = Sampler(10, EOS)
    assert sampler(torch.zeros(0, 10), []).token_ids == []
    with pytest.raises(ValueError):
        sampler(torch.zeros(2, 10), [Row(SamplingParams())])
    with pytest.raises(ValueError):
        sampler(torch.zeros(1, 9), [Row(SamplingParams())])


# -------------------------------------------------------------------------- logprobs


def check_entry(entry, raw_row: torch.Tensor, token: int, num_top: int):
    lp = torch.log_softmax(raw_row.double(), -1)
    assert entry.token_id == token
    assert entry.logprob == pytest.approx(float(lp[token]), abs=2e-5)
    assert entry.rank == 1 + int((raw_row.float() > raw_row.float()[token]).sum())
    best = reference_top(raw_row.float()[None], num_top)[0]
    assert list(entry.top_token_ids) == best
    for got, t in zip(entry.top_logprobs, best, strict=True):
        assert got == pytest.approx(float(lp[t]), abs=2e-5)


def test_logprobs_come_from_the_raw_logits():
    vocab = 5000
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(5, vocab + 8, generator=g) * 3).bfloat16()
    rows = [
        Row(SamplingParams(temperature=0.0, logprobs=0)),
        Row(SamplingParams(temperature=0.7, top_k=20, logprobs=5), seed=1),
        Row(SamplingParams(temperature=1.0, repetition_penalty=2.0, logprobs=20), seed=2),
        Row(SamplingParams(temperature=1.0), seed=3),
        Row(SamplingParams(temperature=1.0, top_p=0.5, logit_bias={4: 9.0}, logprobs=1), seed=4),
    ]
    rows[2].token_ids = list(range(0, 5000, 3))
    out = Sampler(vocab, EOS)(logits, rows)
    assert out.logprobs[3] is None
    for i, n in [(0, 0), (1, 5), (2, 20), (4, 1)]:
        check_entry(out.logprobs[i], logits[i, :vocab], out.token_ids[i], n)
    assert out.logprobs[0].rank == 1 and not out.logprobs[0].top_token_ids


def test_prompt_logprobs_match_log_softmax():
    vocab = 700
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(300, vocab + 4, generator=g) * 2  # more rows than one chunk
    targets = torch.randint(0, vocab, (300,), generator=g)
    for num_top in (0, 4):
        entries = prompt_logprobs(logits, targets, num_top, vocab_size=vocab)
        assert len(entries) == 300
        for i in (0, 1, 255, 256, 299):
            check_entry(entries[i], logits[i, :vocab], int(targets[i]), num_top)
    assert Sampler(vocab, EOS).prompt_logprobs(logits, targets, 2) == prompt_logprobs(
        logits[:, :vocab], targets, 2
    )
