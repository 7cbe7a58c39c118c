"""Greedy output of every supported architecture equals transformers', token for token.

The oracle is transformers in float32, one prompt at a time; the one tolerance is
a near-tie among its top two at the first difference (tests/worker_svc/hf_oracle.py).
Each variant runs through the offline ``LLM`` — the scheduler core and the
ModelRunner together — in the situations that change how tokens are batched:
one prompt, 8 prompts of very different lengths in one batch, prefix-cache hits,
chunked prefill under a tiny token budget, preemption under a tiny KV pool, and
n > 1 samples.
"""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from tests.worker_svc.hf_oracle import (
    VARIANTS,
    assert_matches_reference,
    assert_not_degenerate,
    build_model,
    hf_greedy,
    random_prompts,
    shared_prefix_prompts,
)

NEW_TOKENS = 16
LENGTHS = [1, 3, 17, 40, 64, 99, 5, 128]
MAX_MODEL_LEN = 160
VOCAB = 384


@pytest.fixture(scope="session")
def model_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf-models")


def greedy(n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, n=n)


def make_llm(path, **kwargs) -> LLM:
    options = dict(
        dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=512, show_progress=False
    )
    options.update(kwargs)
    return LLM(path, **options)


def check(llm: LLM, prompts: list[list[int]], refs, params: SamplingParams) -> list:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for i, (out, ref) in enumerate(zip(outputs, refs, strict=True)):
        assert out.prompt_token_ids == prompts[i]
        for sample in out.outputs:
            assert sample.finish_reason == "length"
            assert_matches_reference(sample.token_ids, ref, f"prompt {i} sample {sample.index}")
    return outputs


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, model_root):
    name = request.param
    path = build_model(name, model_root)
    prompts = random_prompts(VOCAB, LENGTHS, seed=11)
    refs = hf_greedy(path, prompts, NEW_TOKENS)
    assert_not_degenerate(refs)
    return name, path, prompts, refs


def test_one_prompt(variant):
    _, path, prompts, refs = variant
    check(make_llm(path), prompts[3:4], refs[3:4], greedy())


def test_a_batch_of_very_different_lengths(variant):
    _, path, prompts, refs = variant
    check(make_llm(path), prompts, refs, greedy())


def test_chunked_prefill_under_a_tiny_token_budget(variant):
    _, path, prompts, refs = variant
    llm = make_llm(path, max_num_batched_tokens=16, max_num_seqs=8)
    check(llm, prompts, refs, greedy())


def test_preemption_under_a_tiny_kv_pool(variant):
    _, path, prompts, refs = variant
    # 48 blocks of 4 tokens: one sequence of max_model_len fits, eight do not.
    llm = make_llm(path, num_kv_blocks=48, block_size=4, max_model_len=152)
    check(llm, prompts, refs, greedy())
    assert llm.scheduler.stats().num_preemptions > 0


def test_n_greedy_samples_are_all_the_reference(variant):
    _, path, prompts, refs = variant
    outputs = check(make_llm(path), prompts[2:5], refs[2:5], greedy(n=3))
    assert all(len(o.outputs) == 3 for o in outputs)


def test_prefix_cache_hits_give_the_same_tokens(variant):
    _, path, _, _ = variant
    prompts = shared_prefix_prompts(VOCAB, prefix_len=70, suffix_lengths=[0, 1, 9, 30], seed=5)
    refs = hf_greedy(path, prompts, NEW_TOKENS)
    llm = make_llm(path, block_size=16)
    check(llm, prompts[:1], refs[:1], greedy())  # fills the cache with the prefix
    outputs = check(llm, prompts[1:], refs[1:], greedy())
    assert all(o.num_cached_tokens >= 64 for o in outputs), [o.num_cached_tokens for o in outputs]
    assert llm.scheduler.stats().prefix_cache_hit_rate > 0
