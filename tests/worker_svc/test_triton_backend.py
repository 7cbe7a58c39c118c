"""The whole model on the Triton backend gives transformers' greedy tokens.

Without a GPU the kernels run under Triton's interpreter (slow, so the model is the
smallest one and the prompts are few); with one, they run compiled. Either way the
launch counters prove that every Triton kernel ran: no silent fallback to torch.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from pagoda import LLM, SamplingParams
from pagoda_kernels.triton_support import LAUNCHES
from tests.worker_svc.hf_oracle import (
    assert_matches_reference,
    build_model,
    hf_greedy,
    random_prompts,
    shared_prefix_prompts,
)

NEW_TOKENS = 8
KERNELS = (
    "reshape_and_cache",
    "paged_attention_decode",
    "paged_attention_prefill",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
)


@pytest.mark.parametrize("name", ["llama", "mistral_sliding", "qwen3"])
def test_triton_backend_matches_transformers(name, tmp_path):
    path = build_model(name, tmp_path)
    # Mixed lengths, and a shared prefix: steps with decodes and prefill chunks
    # together, chunks that start inside the cache, and prefix-cache hits.
    prompts = random_prompts(384, [1, 17, 40], seed=3)
    prompts += shared_prefix_prompts(384, prefix_len=33, suffix_lengths=[0, 5], seed=4)
    refs = hf_greedy(path, prompts, NEW_TOKENS)
    llm = LLM(
        path, dtype="float32", attention_backend="triton", max_model_len=96, num_kv_blocks=64,
        block_size=16, max_num_batched_tokens=48, max_num_seqs=8, show_progress=False,
    )  # fmt: skip
    assert llm.runner.ops.name == "triton"
    before = LAUNCHES.copy()
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for i, (out, ref) in enumerate(zip(outputs, refs, strict=True)):
        assert_matches_reference(out.outputs[0].token_ids, ref, f"{name} prompt {i}")
    ran = {k: LAUNCHES[k] - before[k] for k in KERNELS}
    assert all(ran.values()), f"Triton kernels that never ran: {ran}"
    assert sum(o.num_cached_tokens for o in outputs) >= 32, "the shared prefix was not reused"
