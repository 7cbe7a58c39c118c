"""Prefix-cache events over real sockets, from a scheduler service stepping real workers.

Two replicas (StepWorkers on the real ModelRunner, tiny random-weight Llama) with a KV
pool small enough to evict run prompts that share prefixes. One subscriber is in sync
before any worker joins, another joins mid-run from a snapshot; at the end both must
hold exactly the scheduler's own index of every replica, with no gap in the numbers.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
from dataclasses import replace

import pytest
import zmq

from pagoda.kv_events import KvEventSubscriber, KvIndexMirror
from pagoda.v1 import kv_events_pb2
from scheduler_svc import kv_events
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.kv_events import KvEventPublisher, core_indexes
from tests.scheduler_svc.harness import Cluster
from tests.scheduler_svc.service_harness import (
    FAST_SETTINGS,
    StepWorker,
    asynctest,
    greedy,
    running_service,
    wait_until,
)
from tests.worker_svc.hf_oracle import VOCAB_SIZE, random_prompts

# 12 blocks of 16 tokens per replica, max_model_len 128: about two sequences at a time,
# so the cached prefixes of earlier requests are evicted by later ones.
KV_BLOCKS = 12
MAX_MODEL_LEN = 128
LISTENING = re.compile(
    r"scheduler listening grpc=\S+ step=\S+ http=\S+ kv_events=(\S+):(\d+) kv_snapshot=(\S+):(\d+)"
)


@pytest.fixture(autouse=True)
def fast_heartbeats(monkeypatch):
    """Heartbeats every 0.1 s, so that a subscriber's first snapshot comes soon."""
    monkeypatch.setattr(kv_events, "HEARTBEAT_S", 0.1)


@pytest.fixture(scope="module")
def runners(model_dir):
    """The shared fixture's runners with KV_BLOCKS (12) blocks, so that prefixes evict."""
    from worker_svc.model_runner import ModelRunner

    return [
        ModelRunner(model_dir, dtype="float32", num_kv_blocks=KV_BLOCKS, show_progress=False)
        for _ in range(2)
    ]


class Polling:
    """A subscriber polled by a thread of its own until ``stop``."""

    def __init__(self, events: str, snapshots: str):
        self.sub = KvEventSubscriber(events, snapshots)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sub.poll(0.01)

    async def catch_up(self, sequence_number: int) -> None:
        """Stop the thread, then poll here until the mirror reflects ``sequence_number``."""
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 5)
        reached = await asyncio.to_thread(
            self.sub.poll_until, lambda: self.sub.mirror.sequence_number == sequence_number, 5
        )
        assert reached, (self.sub.mirror.sequence_number, sequence_number)

    def resume(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sub.close()


def prefix_prompts(groups: int, per_group: int, seed: int) -> list[list[int]]:
    """``per_group`` prompts behind each of ``groups`` 40-token prefixes (two full blocks
    and a half), with suffixes of 4 to 30 tokens."""
    heads = random_prompts(VOCAB_SIZE, [40] * groups, seed)
    tails = random_prompts(
        VOCAB_SIZE, [4 + 7 * (i % 4) for i in range(groups * per_group)], seed + 1
    )
    return [heads[i % groups] + tail for i, tail in enumerate(tails)]


def ask_snapshot(address: str) -> kv_events_pb2.KvSnapshot:
    """One snapshot through a plain REQ socket, as a router in another language would ask."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        sock.connect(address)
        sock.send(kv_events_pb2.KvSnapshotRequest().SerializeToString())
        return kv_events_pb2.KvSnapshot.FromString(sock.recv())
    finally:
        sock.close(linger=0)
        ctx.term()


@asynctest
async def test_mid_run_subscribers_rebuild_every_replica_index_exactly(card, runners, monkeypatch):
    settings = replace(FAST_SETTINGS, kv_events_port=0)
    async with running_service(
        card, settings, max_model_len=MAX_MODEL_LEN, max_num_seqs=3
    ) as running:
        service = running.service
        publisher = service.kv_events
        assert publisher is not None
        addresses = running.addresses
        events = f"tcp://127.0.0.1:{addresses.kv_events_port}"
        snapshots = f"tcp://127.0.0.1:{addresses.kv_snapshot_port}"
        assert addresses.listening_line().endswith(
            f" kv_events=127.0.0.1:{addresses.kv_events_port}"
            f" kv_snapshot=127.0.0.1:{addresses.kv_snapshot_port}"
        )
        early = Polling(events, snapshots)
        late = None
        ws: list[StepWorker] = []
        try:
            await wait_until(lambda: early.sub.mirror.in_sync, 5, "the first snapshot")
            assert early.sub.snapshot_numbers == [0]
            ws = [
                StepWorker.for_runner(
                    running.step_address, runners[i], card, f"w{i}", step_delay_s=0.01
                ).start()
                for i in range(2)
            ]
            await wait_until(lambda: all(w.registered for w in ws), what="two replicas")
            session = await running.session()
            ps = prefix_prompts(groups=3, per_group=6, seed=20)
            for i, p in enumerate(ps):
                await session.submit(f"r{i}", p, greedy(10))

            # Subscribe once events are flowing and requests are still running.
            await wait_until(lambda: publisher.sequence_number >= 15, what="fifteen events")
            late = Polling(events, snapshots)
            await wait_until(lambda: late.sub.mirror.in_sync, 5, "the late snapshot")
            for i in range(len(ps)):
                await session.wait_finished(f"r{i}")
            (mid,) = late.sub.snapshot_numbers
            assert mid >= 15, "the late subscriber started from a snapshot taken mid-run"

            final = publisher.snapshot().sequence_number  # publishes what is pending
            await early.catch_up(final)
            await late.catch_up(final)
            truth = core_indexes(service.core)
            replica_ids = {w.welcomes[-1].replica_id for w in ws}
            assert set(truth) == replica_ids, "both replicas cached blocks"
            for polling in (early, late):
                mirror = polling.sub.mirror
                assert mirror.indexes() == truth
                assert polling.sub.gaps == 0 and len(polling.sub.snapshot_numbers) == 1
                assert mirror.block_sizes == {rid: 16 for rid in replica_ids}
            applied = early.sub.mirror.applied
            assert applied["removed"] > 0, "the small pool evicted cached blocks"
            assert applied["stored"] == final - applied["removed"]
            assert sum(late.sub.mirror.applied.values()) == final - mid

            # A REQ client gets the same indexes, parents before children.
            snap = await asyncio.to_thread(ask_snapshot, snapshots)
            assert snap.sequence_number == final
            rebuilt = KvIndexMirror()
            rebuilt.apply_snapshot(snap)
            assert rebuilt.indexes() == truth
            for replica in snap.replicas:
                seen: set[bytes] = set()
                for block in replica.blocks:
                    index = truth[replica.replica_id]
                    assert block.parent_hash not in index or block.parent_hash in seen
                    seen.add(block.block_hash)

            # A worker leaving clears its replica for every subscriber, at once: with the
            # watch task asleep, the leave itself must publish it.
            gone = ws[1].welcomes[-1].replica_id
            early.resume()
            tick = kv_events.WATCH_S
            monkeypatch.setattr(kv_events, "WATCH_S", 3600.0)
            await asyncio.sleep(2 * tick)  # the watch is now in its long sleep
            ws[1].drain()
            await wait_until(lambda: gone not in service.core.replica_ids, 10, "the leave")
            await asyncio.sleep(0)  # the flush scheduled with the leave
            assert publisher.sequence_number > final, "cleared waits for the watch tick"
            final = publisher.snapshot().sequence_number
            await early.catch_up(final)
            assert early.sub.mirror.applied["cleared"] == 1
            assert early.sub.mirror.indexes() == core_indexes(service.core)
            assert gone not in early.sub.mirror.replicas and early.sub.gaps == 0
            await session.close()
        finally:
            for w in ws:
                w.kill()
            early.close()
            if late is not None:
                late.close()


def test_the_scheduler_process_names_its_kv_ports_answers_snapshots_and_stops(model_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "scheduler_svc.server", "--model", str(model_dir),
         "--grpc-port", "0", "--step-port", "0", "--http-port", "0",
         "--kv-events-port", "0"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = ""
        for line in proc.stderr:
            if line.startswith("scheduler listening"):
                break
        match = LISTENING.fullmatch(line.rstrip("\n"))
        assert match is not None, line
        events_port, snapshot_port = int(match[2]), int(match[4])
        assert match[1] == match[3] == "127.0.0.1" and events_port > 0 and snapshot_port > 0
        snap = ask_snapshot(f"tcp://127.0.0.1:{snapshot_port}")
        assert (snap.sequence_number, len(snap.replicas)) == (0, 0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        rest = proc.stderr.read()
        assert "scheduler stopped" in rest and "Traceback" not in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# -- the subscriber's recovery, against a publisher on the pure core ---------------------------


def _cluster() -> Cluster:
    cfg = SchedulerConfig(
        max_model_len=64, block_size=4, max_num_batched_tokens=48, max_num_seqs=4, seed=0
    )
    cluster = Cluster(cfg)
    cluster.join(1, 16)
    return cluster


async def _run(cluster: Cluster, prompts: list[list[int]], tag: str) -> None:
    """Submit and step to the end on the loop, yielding so each step's batch goes out."""
    for i, prompt in enumerate(prompts):
        cluster.submit(f"{tag}{i}", prompt)
    while cluster.step(1) is not None or cluster.scheduler.has_unfinished():
        await asyncio.sleep(0.002)


@asynctest
async def test_a_subscriber_resyncs_after_a_lost_batch_and_after_the_publisher_restarts():
    cluster = _cluster()
    publisher = KvEventPublisher(cluster.scheduler, "127.0.0.1", 0, 0)
    events_port, snapshot_port = publisher.bind()
    publisher.start()
    polling = Polling(f"tcp://127.0.0.1:{events_port}", f"tcp://127.0.0.1:{snapshot_port}")
    sub = polling.sub
    second: KvEventPublisher | None = None
    try:
        await wait_until(lambda: sub.mirror.in_sync, 5, "the first snapshot")
        prompts = random_prompts(512, [9, 13, 17, 9, 21, 6], seed=1)
        await _run(cluster, prompts[:3], "a")
        await wait_until(lambda: sub.mirror.sequence_number == publisher.sequence_number, 5)
        assert sub.mirror.indexes() == core_indexes(cluster.scheduler) != {}

        # One batch lost on the way: the next one shows the gap, and a snapshot repairs it.
        lost: list[bytes] = []
        deliver = sub._on_batch

        def lossy(payload: bytes) -> None:
            if not lost:
                lost.append(payload)
                return
            deliver(payload)

        sub._on_batch = lossy  # type: ignore[method-assign]
        await _run(cluster, prompts[3:], "b")
        await wait_until(
            lambda: sub.mirror.sequence_number == publisher.sequence_number, 5, "the repair"
        )
        assert lost and sub.gaps == 1 and len(sub.snapshot_numbers) == 2
        assert sub.mirror.indexes() == core_indexes(cluster.scheduler)

        # The scheduler restarts on the same ports: numbers start again at 1.
        await publisher.close()
        fresh = _cluster()
        second = KvEventPublisher(fresh.scheduler, "127.0.0.1", events_port, snapshot_port)
        second.bind()
        second.start()
        await wait_until(lambda: len(sub.snapshot_numbers) == 3, 10, "the snapshot after restart")
        await _run(fresh, prompts[1:2], "c")
        await wait_until(
            lambda: sub.mirror.sequence_number == second.sequence_number > 0, 5, "new events"
        )
        assert sub.mirror.indexes() == core_indexes(fresh.scheduler)
        assert sub.gaps == 1
    finally:
        polling.close()
        await publisher.close()
        if second is not None:
            await second.close()
