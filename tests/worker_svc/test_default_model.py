"""The real default model (SmolLM2-135M-Instruct, a GGUF file from PyPI) against transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagoda import LLM, SamplingParams
from pagoda.default_model import default_model_path
from tests.worker_svc.hf_oracle import assert_matches_reference, generate_reference

ONCE_UPON_A_TIME = (
    ", the city of Nova Haven was a thriving metropolis, with towering skyscrapers and bustling"
    " streets. But as"
)


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_model_len=1024, kv_cache_memory=256 << 20, show_progress=False)


@pytest.fixture(scope="module")
def hf_model():
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    model.generation_config.eos_token_id = None
    return model.eval()


def test_once_upon_a_time_equals_transformers(llm, hf_model):
    prompt = llm.get_tokenizer().encode("Once upon a time")
    ref = generate_reference(hf_model, tuple(prompt), 20, "SmolLM2-135M-Instruct")
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    out = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0]
    assert assert_matches_reference(out.token_ids, ref) is None
    assert out.text == ONCE_UPON_A_TIME


def test_chat_answers_like_transformers(llm, hf_model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    sample = out[0].outputs[0]
    assert sample.text == "The capital of France is Paris."
    assert sample.finish_reason == "stop"
    ref = generate_reference(
        hf_model, tuple(out[0].prompt_token_ids), len(sample.token_ids), "chat"
    )
    assert assert_matches_reference(sample.token_ids, ref) is None
