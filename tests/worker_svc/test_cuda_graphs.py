"""Decode steps padded to a CUDA-graph bucket compute what the unpadded step does.

Capturing and replaying graphs needs a GPU (``bench/gpu`` checks the tokens there);
what can go wrong without one is the padding, checked here on the CPU: the padded
forward must give the real rows the same hidden states and must write no KV slot
for the padding rows.
"""

from __future__ import annotations

import pytest
import torch

from pagoda.sampling_params import SamplingParams
from pagoda.v1 import session_pb2
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.scheduler import Scheduler
from tests.worker_svc.hf_oracle import build_model
from worker_svc.cuda_graphs import bucket_for, buckets, decode_metadata, pad_decodes
from worker_svc.model_runner import ModelRunner


def test_buckets_cover_every_batch_size_with_little_padding():
    sizes = buckets(256)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 256
    for n in range(1, 257):
        b = bucket_for(n, sizes)
        assert b is not None and n <= b and (b - n < 8 or n <= 8)
    assert bucket_for(257, sizes) is None
    assert buckets(6) == [1, 2, 4]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = build_model("llama", tmp_path_factory.mktemp("graphs"))
    return ModelRunner(path, dtype="float32", num_kv_blocks=64, block_size=4, show_progress=False)


def test_cuda_graphs_are_refused_without_cuda(tmp_path_factory):
    path = build_model("llama", tmp_path_factory.mktemp("graphs-cpu"))
    with pytest.raises(ValueError, match="CUDA device"):
        ModelRunner(path, dtype="float32", num_kv_blocks=8, cuda_graphs=True, show_progress=False)


def test_padded_decode_step_matches_the_unpadded_one(runner):
    sched = Scheduler(SchedulerConfig(max_model_len=64, block_size=4, seed=0))
    runner.reset(1, sched.join(1, runner.num_kv_blocks))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True).to_proto()
    for i, prompt in enumerate([[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20] * 9]):
        submit = session_pb2.Submit(request_id=f"r{i}", prompt_token_ids=prompt, sampling=params)
        sched.add(submit, 0)
    sched.update(runner.execute(sched.schedule(1, 0)))  # the prefills
    batch = [(state, 1) for state in runner.seqs.values()]
    inputs = runner._prepare(batch)
    assert inputs.meta.num_decodes == 3 == inputs.meta.num_tokens

    width = 16
    padded = pad_decodes(inputs.input_ids, inputs.positions, inputs.meta, 8, width)
    assert padded.slot_mapping.tolist()[3:] == [-1] * 5
    assert padded.block_tables.shape == (8, width)
    before = runner.kv_cache.clone()
    with torch.inference_mode():
        got = runner.model.forward(padded.input_ids, padded.positions, decode_metadata(padded))
        want = runner.model.forward(inputs.input_ids, inputs.positions, inputs.meta)
    torch.testing.assert_close(got[:3], want, atol=1e-5, rtol=1e-5)

    written = inputs.meta.slot_mapping
    untouched = torch.ones(runner.num_kv_blocks * runner.block_size, dtype=torch.bool)
    untouched[written] = False
    slots_before = before.flatten(2, 3)[:, :, untouched]  # [2, layers, slots, heads, dim]
    slots_after = runner.kv_cache.flatten(2, 3)[:, :, untouched]
    assert torch.equal(slots_before, slots_after), "a padding row wrote a KV slot"
    assert runner.kv_cache.flatten(2, 3)[:, :, written].abs().sum() > 0, "real rows wrote"
