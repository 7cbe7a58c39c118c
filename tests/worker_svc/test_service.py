"""The worker service as a real process on real sockets, driven by a scripted scheduler.

One worker process serves most tests; each test registers it afresh (Reset, Hello,
Welcome) so the tests do not depend on each other's state. Leaving (SIGTERM: a drain
the scheduler ends with a Reset) and fatal refusals end a process, so they start their
own.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from pagoda.model_card.writer import identity_of
from pagoda.sampling_params import SamplingParams
from pagoda.v1 import PROTOCOL_VERSION, session_pb2, step_pb2
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.scheduler import Scheduler
from tests.worker_svc.hf_oracle import EOS_ID, VOCAB_SIZE, build_model
from tests.worker_svc.scripted_scheduler import Received, ScriptedScheduler, WorkerProcess
from worker_svc.model_runner import ModelRunner

StepError = step_pb2.StepError
WORKER_ID = "w-test"
BLOCK_SIZE = 16
NUM_KV_BLOCKS = 3072  # room for the long step: 96 sequences of 500 tokens
HEARTBEAT = step_pb2.WorkerConfig(heartbeat_interval_ms=50, heartbeat_timeout_ms=1000)
# One torch thread in the worker and here: the same plans then give bitwise equal logits.
WORKER_FLAGS = ("--num-kv-blocks", str(NUM_KV_BLOCKS), "--threads", "1")
REGISTERED = re.compile(
    r"worker (\S+) registered replica=(\d+) epoch=(\d+) http=127\.0\.0\.1:(\d+)$"
)
_ids = itertools.count(100)


@dataclass
class Started:
    worker: WorkerProcess
    first_hello: Received
    ready_before_welcome: int


@dataclass(frozen=True)
class Replica:
    replica_id: int
    epoch: int


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model("llama", tmp_path_factory.mktemp("service"))


@pytest.fixture(scope="module")
def scheduler() -> Iterator[ScriptedScheduler]:
    sched = ScriptedScheduler()
    yield sched
    sched.close()


@pytest.fixture(scope="module")
def started(model: Path, scheduler: ScriptedScheduler) -> Iterator[Started]:
    worker = WorkerProcess(
        model, scheduler.address, WORKER_ID, *WORKER_FLAGS, "--shared-secret", "s3cret"
    )
    try:
        hello = scheduler.expect("hello", timeout=30)
        yield Started(worker, hello, worker.get("/ready")[0])
    finally:
        worker.kill()


def register(started: Started, sched: ScriptedScheduler, replica_id: int, epoch: int) -> Replica:
    """Reset the worker, take its Hello and welcome it as (replica_id, epoch)."""
    sched.flush()
    sched.send(WORKER_ID, reset=step_pb2.Reset(reason="next test"))
    sched.expect("hello")
    mark = len(started.worker.lines)
    sched.send(
        WORKER_ID,
        welcome=step_pb2.Welcome(replica_id=replica_id, epoch=epoch, config=HEARTBEAT),
    )
    started.worker.wait_for(rf"registered replica={replica_id} epoch={epoch} ", start=mark)
    return Replica(replica_id, epoch)


@pytest.fixture
def replica(started: Started, scheduler: ScriptedScheduler) -> Replica:
    return register(started, scheduler, next(_ids), next(_ids))


def run_plan(sched: ScriptedScheduler, plan: step_pb2.StepPlan) -> Received:
    sched.send(WORKER_ID, plan=plan)
    got = sched.expect("result", timeout=30)
    assert (got.msg.result.replica_id, got.msg.result.epoch, got.msg.result.step) == (
        plan.replica_id, plan.epoch, plan.step,
    )  # fmt: skip
    return got


def prefill_plan(rep: Replica, step: int, num_seqs: int, length: int) -> step_pb2.StepPlan:
    """``num_seqs`` new greedy sequences of ``length`` prompt tokens, computed in one step."""
    params = SamplingParams(temperature=0.0, max_tokens=4).to_proto()
    blocks = -(-length // BLOCK_SIZE)
    plan = step_pb2.StepPlan(replica_id=rep.replica_id, epoch=rep.epoch, step=step)
    for i in range(num_seqs):
        plan.new_sequences.add(
            seq=i + 1,
            token_ids=[3 + (7 * i + 11 * j) % (VOCAB_SIZE - 3) for j in range(length)],
            num_prompt_tokens=length,
            sampling=params,
            block_ids=range(i * blocks, (i + 1) * blocks),
            num_new_tokens=length,
        )
    return plan


def metrics(worker: WorkerProcess) -> dict[tuple[str, tuple], float]:
    status, text = worker.get("/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# -- registration -----------------------------------------------------------------------


def test_hello_reports_the_model_and_ready_waits_for_the_welcome(
    started: Started, scheduler: ScriptedScheduler, model: Path
) -> None:
    got = started.first_hello
    hello = got.msg.hello
    assert got.identity == f"{WORKER_ID}/main"
    assert hello.protocol_version == PROTOCOL_VERSION and hello.worker_id == WORKER_ID
    assert hello.model_identity == identity_of(model)
    assert (hello.vocab_size, list(hello.eos_token_ids)) == (VOCAB_SIZE, [EOS_ID])
    assert (hello.max_model_len, hello.num_kv_blocks, hello.block_size) == (
        512, NUM_KV_BLOCKS, BLOCK_SIZE,
    )  # fmt: skip
    assert (hello.tp_rank, hello.tp_size, hello.dtype, hello.device) == (0, 1, "float32", "cpu")
    assert hello.shared_secret == "s3cret"
    assert started.ready_before_welcome == 503
    assert started.worker.get("/health")[0] == 200

    register(started, scheduler, 7, 9)
    assert started.worker.get("/ready") == (200, "ready\n")
    lines = [line for line in started.worker.lines if "registered" in line]
    match = REGISTERED.search(lines[-1])
    assert match and match.groups()[:3] == (WORKER_ID, "7", "9"), lines[-1]
    assert started.worker.http.endswith(f":{match.group(4)}")


def test_reset_drops_the_registration_and_the_worker_says_hello_again(
    started: Started, scheduler: ScriptedScheduler, replica: Replica
) -> None:
    assert run_plan(scheduler, prefill_plan(replica, 1, 1, 5)).msg.result.seqs == [1]
    scheduler.send(WORKER_ID, reset=step_pb2.Reset(reason="stale epoch"))
    hello = scheduler.expect("hello").msg.hello
    assert hello.worker_id == WORKER_ID and hello.num_kv_blocks == NUM_KV_BLOCKS
    assert started.worker.get("/ready")[0] == 503
    # The old registration is gone: its next step is refused, not computed.
    old = prefill_plan(replica, 2, 1, 5)
    assert run_plan(scheduler, old).msg.result.error.kind == StepError.STALE_EPOCH
    assert metrics(started.worker)[("pagoda_worker_registered", ())] == 0


# -- steps ------------------------------------------------------------------------------


def test_plans_of_the_scheduler_core_give_the_in_process_runners_results(
    started: Started, scheduler: ScriptedScheduler, model: Path
) -> None:
    """Same plans, same code, one thread on both sides: results must be identical, logprobs
    included (no near-tie allowance is needed where no rounding can differ)."""
    core = Scheduler(
        SchedulerConfig(
            max_model_len=512, block_size=BLOCK_SIZE, max_num_batched_tokens=48,
            max_num_seqs=4, eos_token_ids=(EOS_ID,), vocab_size=VOCAB_SIZE, seed=0,
        )
    )  # fmt: skip
    rid = next(_ids)
    epoch = core.join(rid, started.first_hello.msg.hello.num_kv_blocks)
    register(started, scheduler, rid, epoch)
    runner = ModelRunner(
        model, dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=NUM_KV_BLOCKS,
        show_progress=False,
    )  # fmt: skip
    runner.reset(rid, epoch)
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    sampled = SamplingParams(temperature=0.9, top_k=50, seed=7, max_tokens=10, ignore_eos=True)
    for i, length in enumerate([5, 40, 70, 12]):
        prompt = [3 + (13 * i + 5 * j) % (VOCAB_SIZE - 3) for j in range(length)]
        params = sampled if i == 2 else greedy
        core.add(session_pb2.Submit(request_id=f"r{i}", prompt_token_ids=prompt,
                                    sampling=params.to_proto()), 0.0)  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    steps = tokens = 0
    try:
        while (plan := core.schedule(rid, 0.0)) is not None:
            got = run_plan(scheduler, plan).msg.result
            want = runner.execute(plan)
            assert not got.error.kind, got.error
            assert list(got.seqs) == list(want.seqs)
            assert list(got.token_ids) == list(want.token_ids), f"step {plan.step}"
            assert got.logprobs == want.logprobs
            steps, tokens = steps + 1, tokens + len(got.token_ids)
            core.update(got)
    finally:
        torch.set_num_threads(threads)
    assert not core.has_unfinished() and steps > 10 and tokens == 40


def test_metrics_follow_the_steps(started: Started, scheduler: ScriptedScheduler) -> None:
    rep = register(started, scheduler, next(_ids), next(_ids))
    before = metrics(started.worker)
    run_plan(scheduler, prefill_plan(rep, 1, 2, 9))
    after = metrics(started.worker)
    names = {name for name, _ in after}
    for name in (
        "pagoda_worker_steps_total", "pagoda_worker_step_seconds_count",
        "pagoda_worker_running_sequences", "pagoda_worker_kv_blocks",
        "pagoda_worker_registered", "pagoda_worker_tokens_total",
    ):  # fmt: skip
        assert name in names, name

    def grew(name: str) -> float:
        return after[(name, ())] - before[(name, ())]

    assert grew("pagoda_worker_steps_total") == 1 and grew("pagoda_worker_tokens_total") == 2
    assert grew("pagoda_worker_step_seconds_count") == 1
    assert after[("pagoda_worker_running_sequences", ())] == 2
    assert after[("pagoda_worker_kv_blocks", ())] == NUM_KV_BLOCKS
    assert after[("pagoda_worker_registered", ())] == 1
    kernels = [dict(labels)["backend"] for name, labels in after if name == "pagoda_worker_kernels"]
    assert len(kernels) == 1 and kernels[0].startswith("cpu ("), kernels


def test_stale_epochs_and_step_gaps_are_refused_without_compute(
    started: Started, scheduler: ScriptedScheduler, replica: Replica
) -> None:
    before = metrics(started.worker)
    stale = prefill_plan(Replica(replica.replica_id, replica.epoch + 1), 1, 1, 8)
    gap = prefill_plan(replica, 2, 1, 8)
    for plan, kind in ((stale, StepError.STALE_EPOCH), (gap, StepError.STEP_GAP)):
        result = run_plan(scheduler, plan).msg.result
        assert result.error.kind == kind and result.error.detail
        assert not result.seqs and not result.token_ids and result.compute_seconds == 0
    after = metrics(started.worker)
    assert after[("pagoda_worker_steps_total", ())] == before[("pagoda_worker_steps_total", ())]
    for kind in ("STALE_EPOCH", "STEP_GAP"):
        key = ("pagoda_worker_step_errors_total", (("kind", kind),))
        assert after[key] == before.get(key, 0) + 1
    # Refusals leave the worker's state alone: step 1 still runs.
    assert run_plan(scheduler, prefill_plan(replica, 1, 1, 8)).msg.result.seqs == [1]


def test_a_failing_step_is_reported_and_the_worker_keeps_serving(
    started: Started, scheduler: ScriptedScheduler, replica: Replica
) -> None:
    plan = prefill_plan(replica, 1, 1, 4)
    plan.new_sequences[0].token_ids[1] = 10 * VOCAB_SIZE  # no such embedding row
    mark = len(started.worker.lines)
    result = run_plan(scheduler, plan).msg.result
    assert result.error.kind == StepError.EXECUTION_FAILED
    assert "Error" in result.error.detail and not result.seqs
    started.worker.wait_for(rf"worker {WORKER_ID}: step 1 failed", start=mark)
    assert started.worker.get("/health")[0] == 200
    rep = register(started, scheduler, next(_ids), next(_ids))  # as the scheduler would
    assert run_plan(scheduler, prefill_plan(rep, 1, 1, 4)).msg.result.seqs == [1]


# -- liveness ---------------------------------------------------------------------------


def test_heartbeats_keep_flowing_during_a_long_step(
    scheduler: ScriptedScheduler, replica: Replica
) -> None:
    got = run_plan(scheduler, prefill_plan(replica, 1, 96, 500))
    result = got.msg.result
    assert not result.error.kind and len(result.seqs) == 96
    interval = HEARTBEAT.heartbeat_interval_ms / 1000
    assert result.compute_seconds > 5 * interval, "the step was not long enough to tell"
    during = [
        hb for hb in scheduler.heartbeats(since=got.at - result.compute_seconds) if hb.at <= got.at
    ]
    assert len(during) >= 3, (len(during), result.compute_seconds)
    assert {hb.identity for hb in during} == {f"{WORKER_ID}/hb"}
    beat = during[-1].msg.heartbeat
    assert (beat.worker_id, beat.replica_id, beat.epoch) == (
        WORKER_ID, replica.replica_id, replica.epoch,
    )  # fmt: skip
    time.sleep(3 * interval)
    assert scheduler.heartbeats()[-1].msg.heartbeat.last_step == 1


def test_a_silent_scheduler_gets_a_new_hello(
    started: Started, scheduler: ScriptedScheduler, replica: Replica
) -> None:
    scheduler.answer_heartbeats = False
    try:
        silent_since = time.monotonic()
        got = scheduler.expect("hello", timeout=5)
    finally:
        scheduler.answer_heartbeats = True
    timeout = HEARTBEAT.heartbeat_timeout_ms / 1000
    assert got.at - silent_since >= timeout * 0.8
    assert started.worker.get("/ready")[0] == 503
    started.worker.wait_for("heard no heartbeat answer")


def test_a_restarted_scheduler_gets_a_new_hello(
    started: Started, scheduler: ScriptedScheduler, replica: Replica
) -> None:
    restarted_at = time.monotonic()
    scheduler.restart()
    hello = scheduler.expect("hello", timeout=5)
    assert hello.identity == f"{WORKER_ID}/main"
    assert hello.at - restarted_at < 2
    # The new scheduler answers heartbeats: the dropped connection is what tells.
    started.worker.wait_for("lost its connection to the scheduler")
    rep = register(started, scheduler, next(_ids), next(_ids))
    assert run_plan(scheduler, prefill_plan(rep, 1, 1, 4)).msg.result.seqs == [1]


def test_an_unanswered_hello_is_sent_again(
    started: Started, scheduler: ScriptedScheduler, replica: Replica
) -> None:
    """A Hello lost on the way (a scheduler restarting that instant) must not strand the
    worker: until a Welcome or a Refusal comes, it says hello again."""
    scheduler.flush()
    scheduler.send(WORKER_ID, reset=step_pb2.Reset(reason="lose the next hello"))
    first = scheduler.expect("hello", timeout=5)  # not answered: as if it were lost
    second = scheduler.expect("hello", timeout=5)
    assert 1.5 < second.at - first.at < 4
    rep = register(started, scheduler, next(_ids), next(_ids))
    assert run_plan(scheduler, prefill_plan(rep, 1, 1, 4)).msg.result.seqs == [1]


# -- processes of their own -------------------------------------------------------------


def test_sigterm_finishes_the_step_in_hand_drains_and_exits_0_once_released(model: Path) -> None:
    sched = ScriptedScheduler()
    worker = WorkerProcess(model, sched.address, "w-term", *WORKER_FLAGS, "--drain-grace", "20")
    try:
        sched.expect("hello", timeout=30)
        sched.send("w-term", welcome=step_pb2.Welcome(replica_id=1, epoch=1, config=HEARTBEAT))
        worker.wait_for("registered replica=1 epoch=1")
        sched.send("w-term", plan=prefill_plan(Replica(1, 1), 1, 96, 500))
        deadline = time.monotonic() + 10
        while metrics(worker)[("pagoda_worker_step_running", ())] != 1:
            assert time.monotonic() < deadline, "the step never started"
            time.sleep(0.01)
        worker.signal()
        result = sched.expect("result", timeout=30).msg.result
        assert not result.error.kind and len(result.seqs) == 96
        drain = sched.expect("drain").msg.drain
        assert (drain.worker_id, drain.grace_ms) == ("w-term", 20_000)
        worker.wait_for("worker w-term draining: running its sequences for up to 20s")
        assert worker.get("/ready")[0] == 503
        # Draining, it still runs what the scheduler sends for the sequences it holds.
        decode = step_pb2.StepPlan(replica_id=1, epoch=1, step=2, running_seqs=[1, 2])
        decode.running_num_new_tokens.extend([1, 1])
        sched.send("w-term", plan=decode)
        assert list(sched.expect("result", timeout=30).msg.result.seqs) == [1, 2]
        assert worker.proc.poll() is None
        sched.send("w-term", reset=step_pb2.Reset(reason="drained"))
        assert worker.wait() == 0
        worker.wait_for("worker w-term drained \\(released by the scheduler: drained\\)")
    finally:
        worker.kill()
        sched.close()


def test_a_refusal_is_retried_unless_it_is_fatal(model: Path) -> None:
    sched = ScriptedScheduler()
    worker = WorkerProcess(model, sched.address, "w-ref", "--num-kv-blocks", "64")
    try:
        sched.expect("hello", timeout=30)
        sched.send("w-ref", refusal=step_pb2.Refusal(reason="no room now", fatal=False))
        refused_at = time.monotonic()
        again = sched.expect("hello", timeout=5)
        assert again.at - refused_at >= 0.4  # the backoff
        sched.send("w-ref", refusal=step_pb2.Refusal(reason="another model", fatal=True))
        assert worker.wait() == 1
        worker.wait_for("refused by the scheduler: no room now")
        worker.wait_for("refused by the scheduler: another model")
    finally:
        worker.kill()
        sched.close()


def test_the_worker_warms_up_before_its_first_hello(started: Started) -> None:
    """A registered replica can take a step at once: the warm-up (a dummy prefill and
    decode) is over, and logged, before the first Hello goes out."""
    lines = started.worker.lines
    warmed = [i for i, line in enumerate(lines) if re.search(r"warmed up in \S+s \(", line)]
    hellos = [i for i, line in enumerate(lines) if "sent hello" in line]
    assert len(warmed) == 1 and hellos, started.worker.log
    assert warmed[0] < hellos[0], started.worker.log
