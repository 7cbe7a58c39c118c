import random

import pytest

from pagoda.sampling_params import SamplingParams
from pagoda.v1 import common_pb2, session_pb2, step_pb2
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.sequence import Status
from tests.scheduler_svc.harness import Cluster
from tests.scheduler_svc.paged_token_worker import next_token

STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH


def config(**overrides) -> SchedulerConfig:
    base = dict(
        max_model_len=256,
        block_size=4,
        max_num_batched_tokens=64,
        max_num_seqs=16,
        eos_token_ids=(0,),
        seed=0,
    )
    base.update(overrides)
    return SchedulerConfig(**base)


def prompt_of(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 512) for _ in range(n)]


def check_streams(cluster: Cluster, requests: dict[str, tuple[list[int], SamplingParams]]) -> None:
    """Each sequence streamed exactly its reference tokens and finished once, for its reason."""
    for (_, rid, index), stream in cluster.streams.items():
        prompt, params = requests[rid]
        want = cluster.expected(prompt, params, index)
        assert stream.tokens == want, f"{rid}/{index}"
        fin = stream.finished
        assert fin is not None and fin.num_generated_tokens == len(want)
        assert fin.num_prompt_tokens == len(prompt)
        last = want[-1]
        stopped = (last in cluster.config.eos_token_ids and not params.ignore_eos) or (
            last in params.stop_token_ids
        )
        if stopped and len(want) >= params.min_tokens:
            assert fin.reason == STOP and fin.stop_token_id == last
        else:
            assert fin.reason == LENGTH and not fin.HasField("stop_token_id")


def test_mixed_batch_on_two_replicas_streams_the_reference_tokens():
    cluster = Cluster(config())
    cluster.join(0, 80)
    cluster.join(1, 96)
    rng = random.Random(1)
    requests = {}
    for i in range(40):
        params = SamplingParams(
            max_tokens=rng.randrange(1, 40),
            n=rng.choice([1, 1, 2, 3]),
            ignore_eos=rng.random() < 0.5,
        )
        requests[f"r{i}"] = (prompt_of(rng, rng.randrange(1, 90)), params)
        cluster.submit(f"r{i}", *requests[f"r{i}"])
    cluster.run()
    check_streams(cluster, requests)
    for r in (0, 1):
        assert cluster.scheduler.replica(r).blocks.num_free_blocks == cluster.workers[r].num_blocks
    assert {p.replica_id for p in cluster.plans} == {0, 1}


def test_prefix_cache_hit_on_a_shared_system_prompt():
    cluster = Cluster(config())
    cluster.join(0, 64)
    system = list(range(100, 132))  # 32 tokens: 8 full blocks
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    requests = {"a": (system + [7, 8, 9], params), "b": (system + [1, 2], params)}
    cluster.submit("a", *requests["a"])
    cluster.run()
    cluster.submit("b", *requests["b"])
    plan = cluster.step(0)
    (new,) = plan.new_sequences
    assert new.num_cached_tokens == 32 and new.num_new_tokens == 2
    cluster.run()
    check_streams(cluster, requests)
    assert cluster.streams[("", "a", 0)].finished.num_cached_tokens == 0
    assert cluster.streams[("", "b", 0)].finished.num_cached_tokens == 32
    assert cluster.scheduler.stats().prefix_cache_hit_rate > 0


def test_cache_salt_keeps_requests_from_sharing_blocks():
    cluster = Cluster(config())
    cluster.join(0, 64)
    system = list(range(100, 132))
    cluster.submit("a", system + [1], cache_salt="tenant-1")
    cluster.run()
    cluster.submit("b", system + [1], cache_salt="tenant-2")
    cluster.submit("c", system + [1], cache_salt="tenant-1")
    plan = cluster.step(0)
    assert [n.num_cached_tokens for n in plan.new_sequences] == [0, 32]


def test_sequences_admitted_in_one_step_share_blocks_registered_in_that_step():
    cluster = Cluster(config())
    cluster.join(0, 64)
    prompt = list(range(1, 22))  # 5 full blocks and one token
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    cluster.submit("a", prompt, params)
    cluster.submit("b", prompt, params)
    plan = cluster.step(0)
    a, b = plan.new_sequences
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 20)
    assert list(b.block_ids[:5]) == list(a.block_ids[:5]) and b.block_ids[5] != a.block_ids[5]
    cluster.run()
    check_streams(cluster, {"a": (prompt, params), "b": (prompt, params)})


def test_n4_sequences_share_full_prompt_blocks_and_own_the_last():
    cluster = Cluster(config())
    cluster.join(0, 64)
    prompt = list(range(1, 11))  # 2 full blocks + 2 tokens
    params = SamplingParams(n=4, max_tokens=12, ignore_eos=True)
    cluster.submit("r", prompt, params)
    plan = cluster.step(0)
    tables = [list(n.block_ids) for n in plan.new_sequences]
    assert len(tables) == 4
    assert all(t[:2] == tables[0][:2] for t in tables)
    assert len({t[2] for t in tables}) == 4
    blocks = cluster.scheduler.replica(0).blocks
    assert [blocks.ref_counts[b] for b in tables[0][:2]] == [4, 4]
    assert sorted(n.sample_index for n in plan.new_sequences) == [0, 1, 2, 3]
    assert len({n.seed for n in plan.new_sequences}) == 1, "siblings share the request's seed"
    cluster.run()
    check_streams(cluster, {"r": (prompt, params)})
    outs = {tuple(cluster.streams[("", "r", i)].tokens) for i in range(4)}
    assert len(outs) == 4, "each sample streams its own tokens"


def test_a_pool_too_small_preempts_and_every_sequence_still_finishes_right():
    cluster = Cluster(config(max_model_len=64, max_num_batched_tokens=32, max_num_seqs=8))
    cluster.join(0, 16)  # exactly one max_model_len sequence
    rng = random.Random(7)
    requests = {}
    for i in range(8):
        params = SamplingParams(max_tokens=rng.randrange(20, 40), ignore_eos=True)
        requests[f"r{i}"] = (prompt_of(rng, rng.randrange(10, 24)), params)
        cluster.submit(f"r{i}", *requests[f"r{i}"])
    cluster.run()
    check_streams(cluster, requests)
    preempted = sum(len(p.preempted_seqs) for p in cluster.plans)
    assert preempted > 0 and cluster.scheduler.stats().num_preemptions == preempted
    blocks = cluster.scheduler.replica(0).blocks
    assert blocks.num_free_blocks == 16


def test_fcfs_preempts_the_latest_arrival():
    cluster = Cluster(config(max_model_len=32, max_num_batched_tokens=32))
    cluster.join(0, 8)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    cluster.submit("early", list(range(1, 12)), params)
    cluster.submit("late", list(range(20, 31)), params)
    while not any(p.preempted_seqs for p in cluster.plans):
        cluster.step(0)
    late = cluster.scheduler.sequence("late")
    assert late.status is Status.WAITING and late.num_preemptions == 1
    assert cluster.scheduler.sequence("early").status is Status.RUNNING
    preempted_plan = next(p for p in cluster.plans if p.preempted_seqs)
    assert list(preempted_plan.preempted_seqs) == [late.seq_id]
    assert not preempted_plan.new_sequences, "a step that preempts admits nothing"


def test_priority_policy_preempts_the_lowest_priority_and_admits_the_highest_first():
    cluster = Cluster(config(max_model_len=32, max_num_batched_tokens=32, policy="priority"))
    cluster.join(0, 8)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    cluster.submit("low", list(range(1, 12)), params, priority=5)
    cluster.submit("high", list(range(20, 31)), params, priority=-1)
    plan = cluster.step(0)
    assert [n.seq for n in plan.new_sequences] == [
        cluster.scheduler.sequence("high").seq_id,
        cluster.scheduler.sequence("low").seq_id,
    ]
    while not any(p.preempted_seqs for p in cluster.plans):
        cluster.step(0)
    assert cluster.scheduler.sequence("low").status is Status.WAITING
    assert cluster.scheduler.sequence("high").status is Status.RUNNING
    cluster.run()
    check_streams(
        cluster, {"low": (list(range(1, 12)), params), "high": (list(range(20, 31)), params)}
    )


def test_a_preempted_sequence_resumes_through_the_prefix_cache():
    cluster = Cluster(config(max_model_len=48, max_num_batched_tokens=32))
    cluster.join(0, 13)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    requests = {"a": (list(range(1, 20)), params), "b": (list(range(30, 49)), params)}
    for rid, (prompt, p) in requests.items():
        cluster.submit(rid, prompt, p)
    resumed = []
    while cluster.scheduler.has_unfinished():
        plan = cluster.step(0)
        resumed += [n for n in plan.new_sequences if len(n.token_ids) > n.num_prompt_tokens]
    assert resumed, "a preempted sequence came back"
    assert all(n.num_cached_tokens > 0 for n in resumed), "its blocks were still cached"
    check_streams(cluster, requests)


def test_chunked_prefill_of_a_prompt_ten_times_the_budget():
    cluster = Cluster(config(max_model_len=256, max_num_batched_tokens=16, max_num_seqs=4))
    cluster.join(0, 80)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    short = list(range(1, 6))
    long = [(i * 7) % 500 + 1 for i in range(160)]
    cluster.submit("short", short, params)
    cluster.step(0)  # "short" is running and decoding
    cluster.submit("long", long, params)
    steps_to_first_token = 0
    short_tokens = []
    while not cluster.streams[("", "long", 0)].tokens:
        cluster.step(0)
        steps_to_first_token += 1
        short_tokens.append(len(cluster.streams[("", "short", 0)].tokens))
    assert steps_to_first_token >= 160 // 15  # one budget token per step goes to "short"
    assert short_tokens == list(range(short_tokens[0], short_tokens[0] + len(short_tokens))), (
        "the running decode advanced every step while the long prompt was prefilled"
    )
    cluster.run()
    check_streams(cluster, {"short": (short, params), "long": (long, params)})


def test_abort_in_waiting_running_and_preempted_states_frees_everything():
    cluster = Cluster(config(max_model_len=32, max_num_batched_tokens=32))
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    cluster.submit("waiting", list(range(1, 9)), params)
    assert cluster.scheduler.abort("waiting")
    assert cluster.scheduler.num_waiting == 0 and not cluster.scheduler.has_unfinished()
    assert not cluster.scheduler.abort("waiting"), "unknown once aborted"

    cluster.join(0, 8)
    cluster.submit("a", list(range(1, 12)), params)
    cluster.submit("b", list(range(20, 31)), params, owner="gw2")
    while not any(p.preempted_seqs for p in cluster.plans):
        cluster.step(0)
    b = cluster.scheduler.sequence("b", owner="gw2")
    assert b.status is Status.WAITING and b.num_preemptions == 1
    assert cluster.scheduler.abort("b", owner="gw2")  # preempted
    a = cluster.scheduler.sequence("a")
    assert cluster.scheduler.abort("a")  # running
    cluster.scheduler.check_invariants()
    plan = cluster.step(0)
    assert list(plan.finished_seqs) == [a.seq_id] and not plan.running_seqs
    assert cluster.scheduler.replica(0).blocks.num_free_blocks == 8
    assert cluster.scheduler.num_waiting == 0 and not cluster.scheduler.has_unfinished()
    assert cluster.step(0) is None


def test_abort_owner_ends_every_request_of_a_broken_session():
    cluster = Cluster(config())
    cluster.join(0, 64)
    for i in range(3):
        cluster.submit(f"x{i}", [1, 2, 3, i + 4], owner="gw1")
    cluster.submit("x0", [9, 9, 9], owner="gw2")
    cluster.step(0)
    assert cluster.scheduler.abort_owner("gw1") == 3
    cluster.scheduler.check_invariants()
    cluster.run()
    assert cluster.streams[("gw2", "x0", 0)].finished is not None
    assert all(cluster.streams[("gw1", f"x{i}", 0)].finished is None for i in range(3))


def test_abort_unadmitted_drops_only_sequences_that_never_started():
    cluster = Cluster(config(max_num_seqs=2))
    cluster.join(0, 64)
    cluster.join(1, 64)
    for i in range(4):
        cluster.submit(f"r{i}", [1, 2, 3, i + 4], owner="gw1" if i % 2 else "gw2")
    cluster.step(0)  # r0 and r1 start on replica 0
    cluster.step(0)
    cluster.leave(0)  # ... and wait to resume, with tokens streamed
    records = cluster.scheduler.abort_unadmitted()
    assert {o: sorted(r.request_id for r in recs) for o, recs in records.items()} == {
        "gw1": ["r3"],
        "gw2": ["r2"],
    }
    reasons = {r.reason for recs in records.values() for r in recs}
    assert reasons == {common_pb2.FINISH_REASON_ABORT}
    assert cluster.scheduler.num_waiting == 2
    cluster.scheduler.check_invariants()
    cluster.run()
    assert all(cluster.streams[(o, f"r{i}", 0)].finished for i, o in ((0, "gw2"), (1, "gw1")))


def test_finish_ends_one_sequence_and_leaves_its_siblings():
    cluster = Cluster(config())
    cluster.join(0, 64)
    prompt = [5, 6, 7]
    params = SamplingParams(n=3, max_tokens=10, ignore_eos=True)
    cluster.submit("r", prompt, params)
    cluster.step(0)
    cluster.step(0)
    fin = cluster.scheduler.finish("r", 1)
    assert fin is not None and fin.reason == STOP and fin.num_generated_tokens == 2
    assert cluster.scheduler.finish("r", 1) is None, "already over"
    seq1 = cluster.scheduler.sequence("r", 1)
    plan = cluster.step(0)
    assert list(plan.finished_seqs) == [seq1.seq_id]
    cluster.run()
    for i in (0, 2):
        assert cluster.streams[("", "r", i)].tokens == cluster.expected(prompt, params, i)
    assert len(cluster.streams[("", "r", 1)].tokens) == 2


def test_a_replica_leaving_requeues_its_sequences_and_no_token_is_lost_or_repeated():
    cluster = Cluster(config(max_num_seqs=4))
    cluster.join(0, 64)
    cluster.join(1, 64)
    rng = random.Random(3)
    requests = {}
    for i in range(10):
        params = SamplingParams(max_tokens=rng.randrange(10, 30), ignore_eos=True)
        requests[f"r{i}"] = (prompt_of(rng, rng.randrange(5, 40)), params)
        cluster.submit(f"r{i}", *requests[f"r{i}"])
    for _ in range(6):
        cluster.step(0)
        cluster.step(1)
    moved = [s for s in cluster.scheduler.replica(0).running]
    assert moved and all(s.num_output_tokens > 0 for s in moved)
    cluster.leave(0)
    assert all(s.status is Status.WAITING and s.num_computed_tokens == 0 for s in moved)
    cluster.scheduler.check_invariants()
    cluster.run()
    check_streams(cluster, requests)


def test_sequences_wait_in_the_queue_until_a_replica_joins():
    cluster = Cluster(config())
    cluster.submit("r", [1, 2, 3])
    assert cluster.scheduler.num_waiting == 1 and cluster.scheduler.num_running == 0
    cluster.join(5, 64)
    cluster.run()
    assert cluster.streams[("", "r", 0)].finished is not None


def test_admission_is_work_conserving_in_fcfs_order_across_replicas():
    cluster = Cluster(config(max_num_seqs=2))
    cluster.join(0, 64)
    cluster.join(1, 64)
    for i in range(5):
        cluster.submit(f"r{i}", [i + 1] * 3)
    first = cluster.step(1)
    second = cluster.step(0)
    seq = cluster.scheduler.sequence
    assert [n.seq for n in first.new_sequences] == [seq("r0").seq_id, seq("r1").seq_id]
    assert [n.seq for n in second.new_sequences] == [seq("r2").seq_id, seq("r3").seq_id]
    assert seq("r4").status is Status.WAITING


def test_stop_conditions_eos_stop_ids_min_tokens_max_tokens_and_max_model_len():
    prompt = [11, 12, 13]
    ref = []
    tokens = list(prompt)
    for _ in range(12):
        tokens.append(next_token(tokens, 0, 512))
        ref.append(tokens[-1])
    assert len(set(ref[:6])) == 6, "the reference must not repeat early for this test"

    def run(params: SamplingParams, **cfg) -> tuple[list[int], session_pb2.SequenceFinished]:
        cluster = Cluster(config(**cfg))
        cluster.join(0, 64)
        cluster.submit("r", prompt, params)
        cluster.run()
        stream = cluster.streams[("", "r", 0)]
        return stream.tokens, stream.finished

    out, fin = run(SamplingParams(max_tokens=12), eos_token_ids=(ref[2],))
    assert out == ref[:3] and fin.reason == STOP and fin.stop_token_id == ref[2]
    out, fin = run(SamplingParams(max_tokens=12, min_tokens=4), eos_token_ids=(ref[2],))
    assert out == ref[:12] and fin.reason == LENGTH, "EOS before min_tokens is ignored"
    out, fin = run(SamplingParams(max_tokens=12, ignore_eos=True), eos_token_ids=(ref[2],))
    assert out == ref[:12] and fin.reason == LENGTH
    out, fin = run(SamplingParams(max_tokens=12, stop_token_ids=[ref[4]], ignore_eos=True))
    assert out == ref[:5] and fin.reason == STOP and fin.stop_token_id == ref[4]
    out, fin = run(SamplingParams(max_tokens=5), eos_token_ids=(ref[4],))
    assert out == ref[:5] and fin.reason == STOP, "EOS on the last allowed token is a stop"
    out, fin = run(SamplingParams(max_tokens=3), eos_token_ids=())
    assert out == ref[:3] and fin.reason == LENGTH
    out, fin = run(SamplingParams(max_tokens=None), eos_token_ids=(), max_model_len=8)
    assert out == ref[:5] and fin.reason == LENGTH, "stops at max_model_len"
    out, fin = run(SamplingParams(max_tokens=None), eos_token_ids=(), max_model_len=3)
    assert out == ref[:1] and fin.reason == LENGTH, "a prompt of max_model_len gets one token"


def test_tokens_for_ended_sequences_and_stale_results_are_dropped():
    cluster = Cluster(config())
    cluster.join(0, 64)
    cluster.submit("r", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
    scheduler = cluster.scheduler
    plan = scheduler.schedule(0, 0.0)
    seq = scheduler.sequence("r")
    stale = step_pb2.StepResult(
        replica_id=0, epoch=plan.epoch + 1, step=plan.step, seqs=[seq.seq_id], token_ids=[9]
    )
    assert scheduler.update(stale) == {}
    failed = step_pb2.StepResult(replica_id=0, epoch=plan.epoch, step=plan.step)
    failed.error.kind = step_pb2.StepError.STEP_GAP
    assert scheduler.update(failed) == {}
    assert seq.token_ids == [1, 2, 3]
    scheduler.abort("r")
    late = step_pb2.StepResult(
        replica_id=0, epoch=plan.epoch, step=plan.step, seqs=[seq.seq_id], token_ids=[9]
    )
    assert scheduler.update(late) == {}
    scheduler.check_invariants()
    with pytest.raises(ValueError, match="2 tokens"):
        scheduler.update(
            step_pb2.StepResult(replica_id=0, epoch=plan.epoch, seqs=[1], token_ids=[1, 2])
        )


def test_reset_starts_a_new_epoch_and_requeues():
    cluster = Cluster(config())
    worker = cluster.join(0, 64)
    cluster.submit("r", [1, 2, 3, 4, 5], SamplingParams(max_tokens=10, ignore_eos=True))
    cluster.step(0)
    old_epoch = cluster.scheduler.replica(0).epoch
    new_epoch = cluster.scheduler.reset(0)
    assert new_epoch > old_epoch
    # The worker still holds the old epoch: it refuses the plan instead of computing.
    plan = cluster.scheduler.schedule(0, 0.0)
    assert plan.epoch == new_epoch and plan.step == 1
    result = worker.execute(plan.SerializeToString())
    assert result.error.kind == step_pb2.StepError.STALE_EPOCH
    assert cluster.scheduler.update(result) == {}
    # After a new Welcome it runs, and the request resumes by recompute.
    cluster.scheduler.reset(0)
    worker.welcome(0, cluster.scheduler.replica(0).epoch)
    cluster.run()
    assert cluster.streams[("", "r", 0)].tokens == cluster.expected(
        [1, 2, 3, 4, 5], SamplingParams(max_tokens=10, ignore_eos=True)
    )


def test_plans_count_steps_and_idle_replicas_get_none():
    cluster = Cluster(config())
    cluster.join(0, 64)
    assert cluster.scheduler.schedule(0, 0.0) is None
    cluster.submit("r", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
    cluster.run()
    assert [p.step for p in cluster.plans] == [1, 2, 3, 4]
    assert list(cluster.plans[-1].finished_seqs) and not cluster.plans[-1].running_seqs
    assert cluster.scheduler.schedule(0, 0.0) is None


def test_a_request_without_a_seed_gets_one_at_admission_and_a_given_seed_is_kept():
    cluster = Cluster(config())
    cluster.join(0, 64)
    cluster.submit("drawn", [1, 2], SamplingParams(max_tokens=2))
    cluster.submit("given", [1, 2], SamplingParams(max_tokens=2, seed=-5))
    assert cluster.scheduler.sequence("drawn").request.seed is None
    plan = cluster.step(0)
    seeds = {n.seq: n.seed for n in plan.new_sequences}
    assert seeds[cluster.scheduler.sequence("given").seq_id] == 2**64 - 5
    assert (
        cluster.scheduler.sequence("drawn").request.seed
        == seeds[cluster.scheduler.sequence("drawn").seq_id]
    )


def test_invalid_requests_are_refused_and_change_nothing():
    cluster = Cluster(config(max_model_len=16))
    cluster.join(0, 64)
    scheduler = cluster.scheduler

    def submit(**kw) -> session_pb2.Submit:
        base = dict(request_id="r", prompt_token_ids=[1, 2], sampling=SamplingParams().to_proto())
        base.update(kw)
        return session_pb2.Submit(**base)

    with pytest.raises(ValueError, match="at least one token"):
        scheduler.add(submit(prompt_token_ids=[]), 0.0)
    with pytest.raises(ValueError, match="maximum context length is 16"):
        scheduler.add(submit(prompt_token_ids=list(range(17))), 0.0)
    with pytest.raises(ValueError, match="request_id"):
        scheduler.add(submit(request_id=""), 0.0)
    bad = SamplingParams().to_proto()
    bad.temperature = -1.0
    with pytest.raises(ValueError, match="temperature"):
        scheduler.add(submit(sampling=bad), 0.0)
    with pytest.raises(ValueError, match="token id 512 is out of range: the vocabulary has 512"):
        Cluster(config(vocab_size=512)).scheduler.add(submit(prompt_token_ids=[5, 512]), 0.0)
    scheduler.add(submit(), 0.0)
    with pytest.raises(ValueError, match="already"):
        scheduler.add(submit(), 0.0)
    scheduler.add(submit(), 0.0, owner="other-session")  # ids are namespaced by owner
    assert scheduler.num_waiting == 2
    scheduler.check_invariants()


def test_config_and_join_refuse_impossible_settings():
    with pytest.raises(ValueError, match="max_num_seqs"):
        config(max_num_batched_tokens=8, max_num_seqs=16)
    cluster = Cluster(config(max_model_len=256))
    with pytest.raises(ValueError, match="cannot hold"):
        cluster.scheduler.join(0, 10)
    cluster.scheduler.join(0, 64)
    with pytest.raises(ValueError, match="already"):
        cluster.scheduler.join(0, 64)


def test_stats_report_queues_and_replicas():
    cluster = Cluster(config())
    cluster.join(0, 64)
    cluster.submit("a", list(range(1, 10)), SamplingParams(max_tokens=5, ignore_eos=True))
    cluster.submit("b", list(range(1, 30)), SamplingParams(max_tokens=5, ignore_eos=True))
    stats = cluster.scheduler.stats()
    assert (stats.num_waiting, stats.num_running, stats.num_waiting_tokens) == (2, 0, 38)
    cluster.step(0)
    stats = cluster.scheduler.stats()
    assert (stats.num_waiting, stats.num_running) == (0, 2)
    (replica,) = stats.replicas
    assert replica.num_running == 2 and replica.steps == 1
    # "b" shares the two full blocks "a" registered in the same step: 3 + (8 - 2) held.
    assert replica.num_free_blocks == 64 - 3 - 6
    assert replica.kv_usage == pytest.approx(9 / 64)
    assert stats.prefix_cache_hit_rate == pytest.approx(2 / (2 + 7))


def test_a_token_for_a_sequence_still_in_prefill_is_dropped():
    cluster = Cluster(config(max_num_batched_tokens=16))
    cluster.join(0, 64)
    cluster.submit("r", list(range(1, 41)), SamplingParams(max_tokens=3, ignore_eos=True))
    plan = cluster.scheduler.schedule(0, 0.0)
    seq = cluster.scheduler.sequence("r")
    assert seq.num_computed_tokens == 16 < seq.num_tokens
    bogus = step_pb2.StepResult(
        replica_id=0, epoch=plan.epoch, step=plan.step, seqs=[seq.seq_id], token_ids=[9]
    )
    assert cluster.scheduler.update(bogus) == {}
    assert seq.num_tokens == 40


def test_logprobs_reach_the_owner_of_the_sequence():
    cluster = Cluster(config(max_num_batched_tokens=16))
    cluster.join(0, 64)
    params = SamplingParams(max_tokens=2, ignore_eos=True, logprobs=1, prompt_logprobs=0)
    cluster.submit("r", list(range(1, 25)), params, owner="gw")
    scheduler = cluster.scheduler
    seq = scheduler.sequence("r", owner="gw")

    def positions(*tokens: int) -> list[common_pb2.TokenLogprobs]:
        return [common_pb2.TokenLogprobs(token_id=t, logprob=-0.5, rank=1) for t in tokens]

    # A prefill chunk: prompt logprobs, no token yet.
    plan = scheduler.schedule(0, 0.0)
    result = step_pb2.StepResult(replica_id=0, epoch=plan.epoch, step=plan.step)
    result.prompt_logprobs.add(seq=seq.seq_id, positions=positions(2, 3))
    outputs = scheduler.update(result)["gw"]
    assert not outputs.token_ids
    (delta,) = outputs.logprobs
    assert (delta.request_id, delta.index) == ("r", 0)
    assert [p.token_id for p in delta.prompt] == [2, 3] and not delta.tokens
    # The last chunk samples a token: its logprobs travel beside it.
    plan = scheduler.schedule(0, 0.0)
    result = step_pb2.StepResult(
        replica_id=0, epoch=plan.epoch, step=plan.step, seqs=[seq.seq_id], token_ids=[42]
    )
    result.logprobs.add(seq=seq.seq_id, positions=positions(42))
    outputs = scheduler.update(result)["gw"]
    assert list(outputs.token_ids) == [42]
    (delta,) = outputs.logprobs
    assert [p.token_id for p in delta.tokens] == [42] and not delta.prompt


def test_a_sequence_that_computes_its_prompt_again_sends_each_position_once():
    """A sequence preempted or moved (here: its replica reset) computes its prompt again
    from the start; the prompt logprobs it sent before are not sent again."""
    cluster = Cluster(config(max_num_batched_tokens=16))
    cluster.join(0, 64)
    prompt = list(range(1, 25))
    params = SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=0)
    cluster.submit("r", prompt, params, owner="gw")
    scheduler = cluster.scheduler
    seq = scheduler.sequence("r", owner="gw")

    def step(first: int, last: int) -> list[int]:
        """Run a step whose prompt logprobs are those of positions first..last, as the
        worker computes them; returns the prompt tokens whose logprobs went out."""
        plan = scheduler.schedule(0, 0.0)
        result = step_pb2.StepResult(replica_id=0, epoch=plan.epoch, step=plan.step)
        targets = prompt[first : last + 1]
        result.prompt_logprobs.add(
            seq=seq.seq_id, positions=[common_pb2.TokenLogprobs(token_id=t) for t in targets]
        )
        if seq.num_computed_tokens == len(prompt):
            result.seqs.append(seq.seq_id)
            result.token_ids.append(7)
        outputs = scheduler.update(result).get("gw", session_pb2.StepOutputs())
        return [p.token_id for delta in outputs.logprobs for p in delta.prompt]

    assert step(1, 16) == prompt[1:17]  # tokens 0..15 computed: positions 1..16
    scheduler.reset(0)
    assert step(1, 16) == []  # the same chunk again: nothing new
    assert step(17, 23) == prompt[17:24]  # the rest, with the first output token


def test_a_request_asking_for_prompt_logprobs_computes_its_whole_prompt():
    cluster = Cluster(config())
    cluster.join(0, 64)
    system = list(range(100, 132))
    cluster.submit("warm", system + [1])
    cluster.run()
    cluster.submit("plain", system + [2], SamplingParams(max_tokens=2))
    cluster.submit("logprobs", system + [3], SamplingParams(max_tokens=2, prompt_logprobs=0))
    plan = cluster.step(0)
    cached = {n.seq: n.num_cached_tokens for n in plan.new_sequences}
    assert cached[cluster.scheduler.sequence("plain").seq_id] == 32
    assert cached[cluster.scheduler.sequence("logprobs").seq_id] == 0
