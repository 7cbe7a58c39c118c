"""Fixtures the scheduler service's socket tests share: the tiny model, its card, two
real ModelRunners, and the offline engine as the greedy oracle."""

from __future__ import annotations

import pytest

from pagoda.model_card.card import ModelCard
from tests.scheduler_svc.service_harness import KV_BLOCKS, greedy
from tests.worker_svc.hf_oracle import build_model, hf_greedy


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model("llama", tmp_path_factory.mktemp("scheduler-service"))


@pytest.fixture(scope="module")
def card(model_dir):
    return ModelCard.load(model_dir)


@pytest.fixture(scope="module")
def runners(model_dir):
    from worker_svc.model_runner import ModelRunner

    return [
        ModelRunner(model_dir, dtype="float32", num_kv_blocks=KV_BLOCKS, show_progress=False)
        for _ in range(2)
    ]


@pytest.fixture(scope="module")
def offline(model_dir):
    """Greedy tokens of the offline engine for a prompt, computed once per prompt."""
    from pagoda import LLM

    llm = LLM(model_dir, dtype="float32", num_kv_blocks=KV_BLOCKS, show_progress=False)
    cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def tokens(prompt: list[int], max_tokens: int) -> list[int]:
        key = (tuple(prompt), max_tokens)
        if key not in cache:
            out = llm.generate([prompt], greedy(max_tokens), use_tqdm=False)
            cache[key] = list(out[0].outputs[0].token_ids)
        return cache[key]

    return tokens


@pytest.fixture
def check_greedy(offline, model_dir):
    """Assert a streamed sequence equals the offline greedy tokens; where they differ, both
    must agree with HF's greedy tokens up to one near-tie (the project's one tolerance)."""
    from tests.worker_svc.hf_oracle import assert_matches_reference

    def check(prompt: list[int], ours: list[int], max_tokens: int) -> None:
        want = offline(prompt, max_tokens)
        if ours == want:
            return
        ref = hf_greedy(model_dir, [prompt], max_tokens)[0]
        assert_matches_reference(ours, ref, "split stack")
        assert_matches_reference(want, ref, "offline LLM")

    return check
