"""The offline engine's API: vLLM's shape, prompts, stop strings, logprobs, seeds, errors."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from pagoda import LLM, SamplingParams
from tests.worker_svc.hf_oracle import build_model

VLLM_QUICKSTART = """
from pagoda import LLM, SamplingParams

prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
sampling_params = SamplingParams(temperature=0.8, top_p=0.95)

llm = LLM(model={model!r})

outputs = llm.generate(prompts, sampling_params)

for output in outputs:
    prompt = output.prompt
    generated_text = output.outputs[0].text
    print(f"Prompt: {{prompt!r}}, Generated text: {{generated_text!r}}")
    sample = output.outputs[0]
    assert 1 <= len(sample.token_ids) <= 16 and sample.finish_reason in ("stop", "length")
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_model("llama", tmp_path_factory.mktemp("llm-api"))


@pytest.fixture(scope="module")
def llm(model):
    return LLM(model, dtype="float32", max_model_len=256, num_kv_blocks=256, show_progress=False)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **{"max_tokens": 24, "ignore_eos": True, **kw})


def test_vllm_quickstart_runs_with_only_the_import_changed(model):
    script = VLLM_QUICKSTART.format(model=str(model))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("Prompt: ") == 4


def test_prompt_forms_are_equivalent(llm):
    text = "The capital of France is"
    ids = llm.get_tokenizer().encode(text)
    outs = llm.generate([text, ids, {"prompt_token_ids": ids}, {"prompt": text}], greedy())
    assert [o.prompt for o in outs] == [text, None, None, text]
    assert all(o.prompt_token_ids == ids for o in outs)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    assert outs[0].outputs[0].text == llm.get_tokenizer().decode(outs[0].outputs[0].token_ids)
    single = llm.generate(text, greedy())
    assert single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_stop_strings_truncate_the_text(llm):
    prompt = "Numbers: 0 1 2"
    full = llm.generate(prompt, greedy(max_tokens=32))[0].outputs[0]
    text = full.text
    assert len(text) > 12, text
    stop = text[6:9]
    cut = text.index(stop)
    out = llm.generate(prompt, greedy(max_tokens=32, stop=[stop]))[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (text[:cut], "stop", stop)
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    assert len(out.token_ids) < len(full.token_ids)
    kept = llm.generate(prompt, greedy(max_tokens=32, stop=[stop], include_stop_str_in_output=True))
    assert kept[0].outputs[0].text == text[: cut + len(stop)]


def test_stop_token_ids_and_length(llm):
    prompt = [5, 6, 7, 8]
    full = llm.generate(prompt, greedy(max_tokens=12))[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    stop_id = full.token_ids[4]
    first = full.token_ids.index(stop_id)
    out = llm.generate(prompt, greedy(max_tokens=12, stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == full.token_ids[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)


def test_logprobs_have_vllms_shape(llm):
    prompt = [5, 6, 7, 8, 9]
    out = llm.generate(prompt, greedy(max_tokens=6, logprobs=2, prompt_logprobs=1))[0]
    sample = out.outputs[0]
    assert len(sample.logprobs) == 6
    for token, position in zip(sample.token_ids, sample.logprobs, strict=True):
        assert position[token].rank == 1, "greedy picks the most likely token"
        assert len(position) == 2 and all(lp.logprob <= 0 for lp in position.values())
    assert sample.cumulative_logprob == pytest.approx(
        sum(p[t].logprob for t, p in zip(sample.token_ids, sample.logprobs, strict=True))
    )
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for token, position in zip(prompt[1:], out.prompt_logprobs[1:], strict=True):
        assert token in position and len(position) in (1, 2)


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([[9, 10, 11]], params)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.7, max_tokens=20, ignore_eos=True)
    mixed = llm.generate([[4] * 30, [9, 10, 11], [7, 7]], [others, params, others])
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16, ignore_eos=True)
    assert llm.generate([[9, 10, 11]], other_seed)[0].outputs[0].token_ids != alone


def test_n_samples_are_distinct_and_reproducible(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    first = [o.token_ids for o in llm.generate([[3, 4, 5]], params)[0].outputs]
    again = [o.token_ids for o in llm.generate([[3, 4, 5]], params)[0].outputs]
    assert first == again and len({tuple(t) for t in first}) == 3


def test_max_tokens_none_runs_to_max_model_len(model):
    small = LLM(model, dtype="float32", max_model_len=40, num_kv_blocks=64, show_progress=False)
    out = small.generate([list(range(3, 33))], SamplingParams(max_tokens=None, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 10 and out[0].outputs[0].finish_reason == "length"


def test_bad_prompts_raise_and_leave_the_engine_usable(llm):
    with pytest.raises(ValueError, match="maximum context length is 256"):
        llm.generate([[5, 6], list(range(3, 300))], greedy())
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[5, 6], [5, 100_000]], greedy())
    with pytest.raises(ValueError, match="2 prompts but 1 sampling"):
        llm.generate([[5], [6]], [greedy()])
    assert not llm.scheduler.has_unfinished(), "nothing half-submitted stays queued"
    assert len(llm.generate([[5, 6]], greedy())[0].outputs[0].token_ids) == 24


def test_text_prompts_need_a_tokenizer(model, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in model.iterdir():
        if f.name in ("config.json", "model.safetensors"):
            shutil.copy(f, bare / f.name)
    engine = LLM(bare, dtype="float32", max_model_len=64, num_kv_blocks=32, show_progress=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.generate("hello")
    out = engine.generate([[5, 6, 7]], greedy(max_tokens=3))[0].outputs[0]
    assert len(out.token_ids) == 3 and out.text == ""


def test_a_kv_cache_too_small_for_max_model_len_is_a_clear_error(model):
    with pytest.raises(ValueError, match="raise kv_cache_memory or lower max_model_len"):
        LLM(
            model,
            dtype="float32",
            max_model_len=512,
            kv_cache_memory=64 * 1024,
            show_progress=False,
        )


def test_compiled_model_gives_the_eager_tokens(model, llm):
    """torch.compile is opt-in; one short run checks that it computes the same thing."""
    compiled = LLM(
        model, dtype="float32", max_model_len=256, num_kv_blocks=256, compile=True,
        show_progress=False,
    )  # fmt: skip
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], list(range(20, 60))]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(max_tokens=8))]
    got = [o.outputs[0].token_ids for o in compiled.generate(prompts, greedy(max_tokens=8))]
    assert got == want


def test_prompt_logprobs_cover_a_prompt_whose_prefix_is_cached(llm):
    prefix = list(range(3, 70))
    llm.generate([prefix + [80]], greedy(max_tokens=2))  # caches the prefix
    out = llm.generate([prefix + [81]], greedy(max_tokens=2, prompt_logprobs=0))[0]
    assert len(out.prompt_logprobs) == len(prefix) + 1
    assert all(p is not None for p in out.prompt_logprobs[1:])
