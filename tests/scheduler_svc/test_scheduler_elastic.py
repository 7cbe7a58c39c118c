"""The core's rules for replicas that come and go and for a bounded load: draining
replicas, the bounded queue, deadlines, and prefix-affinity routing."""

from __future__ import annotations

import pytest

from pagoda.sampling_params import SamplingParams
from pagoda.v1 import common_pb2, session_pb2
from scheduler_svc.scheduler import QueueFull
from tests.scheduler_svc.harness import Cluster
from tests.scheduler_svc.test_scheduler import check_streams, config

ABORT = common_pb2.FINISH_REASON_ABORT
DRAINING = session_pb2.ReplicaStats.DRAINING
ACTIVE = session_pb2.ReplicaStats.ACTIVE
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


def new_seqs(cluster: Cluster, plan) -> list[str]:
    """The request ids of the sequences a plan admits."""
    if plan is None:
        return []
    names = {}
    for owner, rid, index in cluster.streams:
        try:
            names[cluster.scheduler.sequence(rid, index, owner).seq_id] = rid
        except KeyError:  # over already
            continue
    return [names[n.seq] for n in plan.new_sequences]


# -- draining -------------------------------------------------------------------------------


def test_a_draining_replica_admits_nothing_and_finishes_what_it_runs():
    cluster = Cluster(config())
    cluster.join(0, 64)
    requests = {r: ([10 + i] * (5 + i), PARAMS) for i, r in enumerate("abc")}
    cluster.submit("a", *requests["a"])
    cluster.submit("b", *requests["b"])
    assert new_seqs(cluster, cluster.step(0)) == ["a", "b"]
    cluster.scheduler.drain(0)
    cluster.submit("c", *requests["c"])
    plan = cluster.step(0)
    assert not plan.new_sequences and len(plan.running_seqs) == 2
    (replica,) = cluster.scheduler.stats().replicas
    assert replica.state == DRAINING and replica.num_running == 2
    while cluster.scheduler.replica(0).running:
        assert not cluster.step(0).new_sequences
    assert cluster.scheduler.num_waiting == 1, "c waits for a replica that takes work"
    cluster.leave(0)
    cluster.join(1, 64)
    cluster.run()
    check_streams(cluster, requests)


def test_a_draining_replica_that_leaves_before_the_end_hands_its_sequences_over():
    cluster = Cluster(config())
    cluster.join(0, 64)
    cluster.join(1, 64)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    requests = {r: (list(range(3 + i, 30 + i)), params) for i, r in enumerate("ab")}
    for rid, (prompt, params) in requests.items():
        cluster.submit(rid, prompt, params)
    cluster.step(0)
    for _ in range(5):
        cluster.step(0)
    cluster.scheduler.drain(0)
    cluster.step(0)
    cluster.leave(0)  # the grace period is over: what is left is re-queued
    assert cluster.scheduler.num_waiting == 2
    cluster.run()
    check_streams(cluster, requests)


# -- the bounded queue ----------------------------------------------------------------------


def test_the_queue_is_bounded_in_sequences_exactly():
    cluster = Cluster(config(max_waiting_requests=3))
    scheduler = cluster.scheduler
    cluster.submit("a", [5, 6])
    cluster.submit("b", [5, 6], SamplingParams(n=2, max_tokens=4))
    with pytest.raises(QueueFull, match="3 sequences waiting, at most 3"):
        cluster.submit("c", [7])
    assert scheduler.num_waiting == 3 and scheduler.num_waiting_tokens == 6
    with pytest.raises(ValueError, match="needs 4 sequences") as err:
        cluster.submit("big", [7], SamplingParams(n=4))
    assert not isinstance(err.value, QueueFull), "a request that never fits is invalid"
    cluster.join(0, 64)
    cluster.step(0)  # admits all three: the queue is empty again
    cluster.submit("c", [7], SamplingParams(n=3, max_tokens=2))
    with pytest.raises(QueueFull):
        cluster.submit("d", [7])
    scheduler.abort("c")
    cluster.submit("d", [7])  # the same request id was never taken by the refused submit
    scheduler.check_invariants()


def test_the_queue_is_bounded_in_tokens_exactly_counting_sequences_waiting_to_resume():
    cluster = Cluster(config(max_waiting_tokens=100))
    scheduler = cluster.scheduler
    cluster.submit("a", [3] * 60)
    cluster.submit("b", [4] * 20, SamplingParams(n=2, max_tokens=30, ignore_eos=True))
    assert scheduler.num_waiting_tokens == 100
    with pytest.raises(QueueFull, match="prompt tokens"):
        cluster.submit("c", [5])
    with pytest.raises(ValueError, match="needs 101 prompt tokens"):
        cluster.submit("huge", [5] * 101)
    cluster.join(0, 128)
    for _ in range(4):
        cluster.step(0)
    assert scheduler.num_waiting_tokens == 0
    cluster.submit("c", [5] * 10)
    produced = sum(len(stream.tokens) for stream in cluster.streams.values())
    assert produced >= 3
    cluster.leave(0)  # a and b are waiting again, with the tokens they produced
    waiting = 60 + 20 + 20 + 10 + produced
    assert scheduler.num_waiting_tokens == waiting == scheduler.stats().num_waiting_tokens
    with pytest.raises(QueueFull):
        cluster.submit("d", [5])
    scheduler.check_invariants()


# -- deadlines ------------------------------------------------------------------------------


def test_expire_ends_waiting_and_running_requests_past_their_deadline():
    cluster = Cluster(config(max_num_seqs=3))
    scheduler = cluster.scheduler
    cluster.join(0, 64)
    long = SamplingParams(max_tokens=50, ignore_eos=True)
    cluster.submit("running", [1, 2, 3], long, deadline_unix_ms=1_000, owner="gw")
    pair = SamplingParams(n=2, max_tokens=50, ignore_eos=True)
    cluster.submit("pair", [4, 5, 6], pair, deadline_unix_ms=2_000)
    cluster.submit("waiting", [7, 8], long, deadline_unix_ms=1_500, owner="gw")
    cluster.submit("forever", [9], long)
    cluster.step(0)
    cluster.step(0)
    assert scheduler.num_running == 3 and scheduler.num_waiting == 2
    assert scheduler.expire(999) == {}
    gone = scheduler.expire(1_500)
    assert sorted((owner, f.request_id, f.reason) for owner, fins in gone.items() for f in fins) \
        == [("gw", "running", ABORT), ("gw", "waiting", ABORT)]  # fmt: skip
    fin = gone["gw"][0]
    assert fin.num_generated_tokens == len(cluster.streams[("gw", "running", 0)].tokens) == 2
    for owner, records in gone.items():
        cluster.deliver(owner, session_pb2.StepOutputs(finished=records))
    plan = cluster.step(0)
    assert len(plan.finished_seqs) == 1, "the worker is told to drop the expired sequence"
    records = scheduler.expire(10_000)[""]
    assert [(f.request_id, f.index) for f in records] == [("pair", 0), ("pair", 1)]
    cluster.deliver("", session_pb2.StepOutputs(finished=records))
    cluster.run()
    assert cluster.streams[("", "forever", 0)].finished.num_generated_tokens == 50
    cluster.submit("done", [9, 9], SamplingParams(max_tokens=1), deadline_unix_ms=20_000)
    cluster.run()
    assert scheduler.expire(30_000) == {}, "a request over before its deadline is not expired"
    assert cluster.streams[("", "done", 0)].finished.reason != ABORT
    blocks = scheduler.replica(0).blocks
    assert blocks.num_free_blocks == blocks.num_blocks and not scheduler.has_unfinished()


# -- prefix affinity ------------------------------------------------------------------------

SYSTEM = list(range(100, 164))  # 64 tokens: 16 blocks of 4


def run_on(cluster: Cluster, replica: int) -> None:
    """Step only ``replica`` until nothing is left, letting the clock run so that a request
    left for another replica (which never steps here) comes back to this one."""
    while cluster.scheduler.has_unfinished():
        cluster.step(replica)
        cluster.now += 1.0


def warm(cluster: Cluster, replica: int) -> None:
    """Run a request with the SYSTEM prefix on ``replica`` alone, so it caches the prefix."""
    cluster.submit("warm", SYSTEM + [1], SamplingParams(max_tokens=2, ignore_eos=True))
    run_on(cluster, replica)


def affinity_cluster(wait: float = 0.2, **overrides) -> Cluster:
    cluster = Cluster(config(affinity_wait_s=wait, **overrides))
    cluster.join(0, 64)
    cluster.join(1, 64)
    warm(cluster, 0)
    return cluster


def test_a_request_waits_for_the_replica_caching_its_prefix_while_others_pass_it():
    cluster = affinity_cluster()
    cluster.submit("shared", SYSTEM + [2, 3])
    cluster.submit("other", [7] * 9)
    cluster.now = 100.0
    plan = cluster.step(1)  # replica 1 asks first: it leaves "shared" and takes "other"
    assert new_seqs(cluster, plan) == ["other"]
    assert cluster.scheduler.replica(1).deferred_until == pytest.approx(100.2)
    assert cluster.scheduler.sequence("shared").passed_over_at == 100.0
    cluster.now = 100.1
    assert not cluster.step(1).new_sequences, "still left for replica 0"
    plan = cluster.step(0)
    assert new_seqs(cluster, plan) == ["shared"]
    assert plan.new_sequences[0].num_cached_tokens == 64
    cluster.run()
    assert cluster.streams[("", "shared", 0)].finished.num_cached_tokens == 64


def test_after_the_wait_any_replica_takes_it_so_nothing_starves():
    cluster = affinity_cluster(max_num_batched_tokens=160)
    cluster.submit("shared", SYSTEM + [2, 3])
    cluster.submit("later", SYSTEM + [4, 5])
    cluster.now = 50.0
    assert cluster.step(1) is None  # both left for replica 0, which does not step
    cluster.now = 50.15
    assert cluster.step(1) is None, "counted from the first pass, not from the last"
    cluster.now = 50.2
    plan = cluster.step(1)
    assert new_seqs(cluster, plan) == ["shared", "later"]
    assert plan.new_sequences[0].num_cached_tokens == 0
    assert plan.new_sequences[1].num_cached_tokens == 64, "later shares what shared computes"
    cluster.run()
    cluster.scheduler.check_invariants()


def test_a_passed_request_keeps_its_place_in_the_queue():
    cluster = affinity_cluster(max_num_seqs=2)
    cluster.submit("shared", SYSTEM + [2, 3])
    cluster.submit("x", [7] * 5)
    cluster.submit("y", [8] * 5)
    cluster.submit("z", [9] * 5)
    cluster.now = 100.0
    assert new_seqs(cluster, cluster.step(1)) == ["x", "y"]  # two seats: x and y, not shared
    assert new_seqs(cluster, cluster.step(0)) == ["shared", "z"]


@pytest.mark.parametrize("why", ["draining", "no seats", "no blocks", "affinity off"])
def test_a_replica_without_room_or_draining_is_not_waited_for(why):
    wait = 0.0 if why == "affinity off" else 0.2
    cluster = affinity_cluster(wait, max_num_seqs=2, max_num_batched_tokens=256)
    if why == "draining":
        cluster.scheduler.drain(0)
    elif why == "no seats":
        cluster.submit("s1", [3] * 4, PARAMS)
        cluster.submit("s2", [4] * 4, PARAMS)
        cluster.step(0)  # takes s1 and leaves s2 to the idle replica 1 (load spread) ...
        cluster.now += 0.2
        cluster.step(0)  # ... which does not step: after the wait, replica 0 takes it
        assert len(cluster.scheduler.replica(0).running) == 2
    elif why == "no blocks":
        cluster.submit("hog", [5] * 192, SamplingParams(max_tokens=50, ignore_eos=True))
        cluster.step(0)  # 48 of 64 blocks held, the 16 left cache the prefix: no block to spare
        assert cluster.scheduler.replica(0).blocks.num_free_blocks == 16
    cluster.submit("shared", SYSTEM + [2, 3])
    cluster.now = 100.0
    assert "shared" in new_seqs(cluster, cluster.step(1))
    cluster.run()
    cluster.scheduler.check_invariants()


def test_the_replica_caching_more_wins_among_several():
    cluster = Cluster(config(affinity_wait_s=0.2))
    for r in range(3):
        cluster.join(r, 64)
    cluster.submit("half", SYSTEM[:32] + [1], SamplingParams(max_tokens=1))
    run_on(cluster, 1)
    warm(cluster, 2)
    cluster.submit("shared", SYSTEM + [2, 3])
    cluster.now = 100.0
    assert not new_seqs(cluster, cluster.step(0))
    assert not new_seqs(cluster, cluster.step(1)), "replica 1 caches 8 blocks, replica 2 16"
    plan = cluster.step(2)
    assert new_seqs(cluster, plan) == ["shared"] and plan.new_sequences[0].num_cached_tokens == 64


# -- load spread ----------------------------------------------------------------------------


def burst(cluster: Cluster, count: int) -> dict[str, tuple[list[int], SamplingParams]]:
    """``count`` requests sharing no prefix, submitted at once."""
    requests = {f"r{i}": ([20 + i] * (5 + i % 3), PARAMS) for i in range(count)}
    for rid, (prompt, params) in requests.items():
        cluster.submit(rid, prompt, params)
    return requests


def spread_cluster(replicas: int = 2, **overrides) -> Cluster:
    cluster = Cluster(config(**{"affinity_wait_s": 0.2, **overrides}))
    for r in range(replicas):
        cluster.join(r, 64)
    cluster.now = 100.0
    return cluster


@pytest.mark.parametrize("replicas", [2, 3])
def test_a_burst_on_idle_replicas_is_shared_out_evenly(replicas):
    cluster = spread_cluster(replicas)
    requests = burst(cluster, 12)
    taken = [new_seqs(cluster, cluster.step(r)) for r in range(replicas)]
    assert [len(t) for t in taken] == [12 // replicas] * replicas
    assert sorted(r for t in taken for r in t) == sorted(requests), "each exactly once"
    assert taken[0] == [f"r{i}" for i in range(0, 12, replicas)], "queue order kept"
    cluster.run()
    check_streams(cluster, requests)
    cluster.scheduler.check_invariants()


def test_the_less_loaded_replica_gets_the_next_request():
    cluster = spread_cluster()
    burst(cluster, 4)
    cluster.step(0)
    cluster.step(1)  # two each
    cluster.submit("late", [9] * 6, PARAMS)
    assert new_seqs(cluster, cluster.step(0)) == ["late"], "a tie: the replica asking takes it"
    cluster.submit("later", [8] * 6, PARAMS)
    assert not new_seqs(cluster, cluster.step(0)), "replica 0 runs one more than replica 1"
    assert new_seqs(cluster, cluster.step(1)) == ["later"]


@pytest.mark.parametrize("why", ["draining", "no seats", "spread off", "waited"])
def test_no_request_waits_for_a_replica_that_cannot_or_does_not_take_it(why):
    cluster = spread_cluster(max_num_seqs=4, affinity_wait_s=0.0 if why == "spread off" else 0.2)
    if why == "draining":
        cluster.scheduler.drain(1)
    elif why == "no seats":
        burst(cluster, 4)
        cluster.step(1)  # half of the burst, the rest left for replica 0 ...
        cluster.now += 0.2
        cluster.step(1)  # ... which does not step: after the wait replica 1 takes it all
        assert len(cluster.scheduler.replica(1).running) == 4
    requests = {f"x{i}": ([30 + i] * 5, PARAMS) for i in range(4)}
    for rid, (prompt, params) in requests.items():
        cluster.submit(rid, prompt, params)
    taken = new_seqs(cluster, cluster.step(0))
    if why == "waited":  # replica 1 never steps: after the wait, replica 0 takes the rest
        assert taken == ["x0", "x2"]
        cluster.now += 0.2
        taken += new_seqs(cluster, cluster.step(0))
    assert sorted(taken) == sorted(requests)
