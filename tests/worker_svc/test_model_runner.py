"""The ModelRunner follows the step protocol: it applies diffs and refuses plans it cannot trust."""

from __future__ import annotations

import pytest

from pagoda.sampling_params import SamplingParams
from pagoda.v1 import session_pb2, step_pb2
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.scheduler import Scheduler
from tests.worker_svc.hf_oracle import build_model
from worker_svc.model_runner import ModelRunner

StepError = step_pb2.StepError


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = build_model("llama", tmp_path_factory.mktemp("runner"))
    return ModelRunner(path, dtype="float32", num_kv_blocks=64, block_size=4, show_progress=False)


@pytest.fixture
def scheduler(runner):
    sched = Scheduler(SchedulerConfig(max_model_len=128, block_size=4, seed=0))
    runner.reset(3, sched.join(3, runner.num_kv_blocks))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True).to_proto()
    for i, prompt in enumerate([[5, 6, 7], [8, 9, 10, 11, 12, 13]]):
        sched.add(
            session_pb2.Submit(request_id=f"r{i}", prompt_token_ids=prompt, sampling=params), 0
        )
    return sched


def refused(runner: ModelRunner, plan: step_pb2.StepPlan, kind: int) -> None:
    before = {s: list(st.token_ids) for s, st in runner.seqs.items()}
    last = runner.last_step
    result = runner.execute(plan)
    assert result.error.kind == kind, result
    assert not result.seqs and not result.token_ids
    assert runner.last_step == last
    assert {s: st.token_ids for s, st in runner.seqs.items()} == before, "state changed"


def test_a_valid_plan_runs_and_the_state_follows_the_diffs(runner, scheduler):
    plan = scheduler.schedule(3, 0)
    result = runner.execute(plan)
    assert not result.error.kind and len(result.seqs) == 2 and result.compute_seconds > 0
    scheduler.update(result)
    a, b = (runner.seqs[n.seq] for n in plan.new_sequences)
    assert (len(a.token_ids), len(b.token_ids)) == (4, 7)
    scheduler.abort("r0")
    plan = scheduler.schedule(3, 0)
    assert list(plan.finished_seqs) == [a.seq]
    result = runner.execute(plan)
    assert list(result.seqs) == [b.seq] and a.seq not in runner.seqs


def test_stale_epochs_step_gaps_and_unknown_sequences_are_refused(runner, scheduler):
    plan = scheduler.schedule(3, 0)
    stale = step_pb2.StepPlan()
    stale.CopyFrom(plan)
    stale.epoch += 1
    refused(runner, stale, StepError.STALE_EPOCH)
    gap = step_pb2.StepPlan()
    gap.CopyFrom(plan)
    gap.step += 1
    refused(runner, gap, StepError.STEP_GAP)
    scheduler.update(runner.execute(plan))
    plan = scheduler.schedule(3, 0)
    unknown = step_pb2.StepPlan()
    unknown.CopyFrom(plan)
    unknown.running_seqs.append(999)
    unknown.running_num_new_tokens.append(1)
    refused(runner, unknown, StepError.UNKNOWN_SEQUENCE)
    assert not runner.execute(plan).error.kind, "the real plan still runs after refusals"


def test_inconsistent_plans_are_refused(runner, scheduler):
    plan = scheduler.schedule(3, 0)
    bad_block = step_pb2.StepPlan()
    bad_block.CopyFrom(plan)
    bad_block.new_sequences[0].block_ids[0] = runner.num_kv_blocks
    refused(runner, bad_block, StepError.INVALID_PLAN)
    too_many = step_pb2.StepPlan()
    too_many.CopyFrom(plan)
    too_many.new_sequences[0].num_new_tokens += 5
    refused(runner, too_many, StepError.INVALID_PLAN)
    assert not runner.execute(plan).error.kind


def test_reset_forgets_everything(runner, scheduler):
    plan = scheduler.schedule(3, 0)
    runner.execute(plan)
    assert runner.seqs
    runner.reset(3, 77)
    assert not runner.seqs and (runner.epoch, runner.last_step) == (77, 0)


def test_warm_up_leaves_the_state_and_the_answers_as_they_were(tmp_path):
    """The warm-up's dummy sequence is gone afterwards, and a runner that warmed up
    samples exactly what a cold one does, whatever blocks the plans reuse."""
    path = build_model("llama", tmp_path)
    cold, warm = (
        ModelRunner(path, dtype="float32", num_kv_blocks=16, block_size=4, show_progress=False)
        for _ in range(2)
    )
    assert warm.warm_up() == 16
    assert (warm.seqs, warm.replica_id, warm.epoch, warm.last_step) == ({}, 0, 0, 0)
    tokens = []
    for runner in (cold, warm):
        sched = Scheduler(SchedulerConfig(max_model_len=64, block_size=4, seed=0))
        runner.reset(1, sched.join(1, runner.num_kv_blocks))
        params = SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True).to_proto()
        for i in range(3):
            prompt = [5 + i, 6, 7, 8, 9, 10, 11][: 3 + 2 * i]
            sched.add(session_pb2.Submit(request_id=f"r{i}", prompt_token_ids=prompt,
                                         sampling=params), 0)  # fmt: skip
        out = []
        while (plan := sched.schedule(1, 0)) is not None:
            result = runner.execute(plan)
            out.append((list(result.seqs), list(result.token_ids)))
            sched.update(result)
        tokens.append(out)
    assert tokens[0] == tokens[1] and sum(len(t) for _, t in tokens[0]) == 18


def test_the_runner_gives_memory_back_once_when_it_goes_idle(runner, scheduler, monkeypatch):
    calls = []
    monkeypatch.setattr(
        "worker_svc.model_runner.release_freed_memory", lambda: calls.append(len(runner.seqs))
    )
    steps = 0
    while (plan := scheduler.schedule(3, 0)) is not None:
        result = runner.execute(plan)
        assert not result.error.kind
        scheduler.update(result)
        steps += 1
        assert calls == ([0] if not runner.seqs else []), (steps, calls)
    assert steps > 8 and calls == [0], "released once, with nothing left to run"
