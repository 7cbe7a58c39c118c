"""Prefix-cache events without sockets: the block manager's hooks, the recorder's numbering
and catch-up, snapshots, and a mirror rebuilt from them that must equal the real index."""

from __future__ import annotations

import argparse
import random

import pytest

from pagoda.kv_events import KvIndexMirror
from pagoda.sampling_params import SamplingParams
from pagoda.v1 import kv_events_pb2
from scheduler_svc import server
from scheduler_svc.block_hash import extend_hashes
from scheduler_svc.block_manager import BLOCK_REMOVED, BLOCK_STORED, BlockManager
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.kv_events import KvEventRecorder, block_index, core_indexes
from scheduler_svc.service import Addresses
from scheduler_svc.settings import ServiceSettings
from tests.scheduler_svc.harness import Cluster

BS = 4


def hashes(tokens: list[int]) -> list[bytes]:
    out: list[bytes] = []
    extend_hashes(out, tokens, BS)
    return out


def start(bm: BlockManager, seq_id: int, tokens: list[int]) -> list[int]:
    h = hashes(tokens)
    table = bm.admit(seq_id, bm.lookup(h, len(tokens)), len(tokens), 0)
    assert table is not None
    bm.register(seq_id, h, tokens, len(tokens), b"")
    return table


# -- the block manager's hooks -------------------------------------------------------------


def test_stored_events_carry_the_parent_hash_and_tokens_and_removed_follows_eviction():
    bm = BlockManager(num_blocks=4, block_size=BS)
    heard: list[tuple[int, bytes, bytes, tuple[int, ...]]] = []
    bm.listener = lambda *event: heard.append(event)
    a = list(range(1, 10))  # two full blocks and one partial
    ha = hashes(a)
    start(bm, 1, a)
    assert heard == [
        (BLOCK_STORED, ha[0], b"", (1, 2, 3, 4)),
        (BLOCK_STORED, ha[1], ha[0], (5, 6, 7, 8)),
    ]
    heard.clear()
    start(bm, 2, a[:8] + [99])  # a hit on both blocks: the index does not change
    assert heard == []
    bm.free(1)
    bm.free(2)
    assert heard == [], "freeing keeps the hashes"
    b = [50, 51, 52, 53, 54, 55, 56, 57, 58]
    hb = hashes(b)
    # Three blocks from the LRU queue (two plain partial blocks, then a's tail block):
    # the tail's hash leaves the index before b's blocks enter it.
    start(bm, 3, b)
    assert heard == [
        (BLOCK_REMOVED, ha[1], b"", ()),
        (BLOCK_STORED, hb[0], b"", (50, 51, 52, 53)),
        (BLOCK_STORED, hb[1], hb[0], (54, 55, 56, 57)),
    ]
    assert set(block_index(bm)) == {ha[0], hb[0], hb[1]}
    bm.check_invariants()


def test_a_duplicate_block_stays_private_and_is_not_reported():
    bm = BlockManager(num_blocks=8, block_size=BS)
    heard: list[tuple[int, bytes, bytes, tuple[int, ...]]] = []
    bm.listener = lambda *event: heard.append(event)
    tokens = [7] * 8
    h = hashes(tokens)
    for seq_id in (1, 2):  # both computed side by side: no lookup hit for the second
        bm.admit(seq_id, [], 8, 0)
    bm.register(1, h, tokens, 8, b"")
    bm.register(2, h, tokens, 8, b"")
    assert [e[1] for e in heard] == h, "only the first copy of each block is indexed"


def test_without_a_listener_the_index_is_the_same():
    runs = []
    for listening in (False, True):
        bm = BlockManager(num_blocks=6, block_size=BS)
        if listening:
            bm.listener = lambda *event: None
        rng = random.Random(3)
        for seq_id in range(1, 30):
            tokens = [rng.randrange(1, 4) for _ in range(rng.randrange(1, 14))]
            if bm.admit(seq_id, [], len(tokens), 0) is None:
                continue
            bm.register(seq_id, hashes(tokens), tokens, len(tokens), b"")
            bm.free(seq_id)
        runs.append((block_index(bm), list(bm._free)))
    assert runs[0] == runs[1]


# -- the recorder against the pure core ----------------------------------------------------


def config(**overrides) -> SchedulerConfig:
    base = dict(
        max_model_len=64,
        block_size=BS,
        max_num_batched_tokens=48,
        max_num_seqs=4,
        eos_token_ids=(0,),
        seed=0,
    )
    base.update(overrides)
    return SchedulerConfig(**base)


class Feed:
    """A recorder on a Cluster's core, and every batch it has produced."""

    def __init__(self, cluster: Cluster):
        self.core = cluster.scheduler
        self.recorder = KvEventRecorder(self.core)
        self.batches: list[kv_events_pb2.KvEventBatch] = []

    def take(self) -> kv_events_pb2.KvEventBatch | None:
        batch = self.recorder.take()
        if batch is not None:
            self.batches.append(batch)
        return batch

    @property
    def numbers(self) -> list[int]:
        return [e.sequence_number for b in self.batches for e in b.events]

    def kinds(self) -> list[str]:
        return [str(e.WhichOneof("kind")) for b in self.batches for e in b.events]


def shared_prefix_prompts(rng: random.Random, n: int, groups: int = 3) -> list[list[int]]:
    heads = [[rng.randrange(1, 512) for _ in range(3 * BS)] for _ in range(groups)]
    return [heads[i % groups] + [rng.randrange(1, 512) for _ in range(rng.randrange(1, 9))]
            for i in range(n)]  # fmt: skip


def test_events_numbered_without_gaps_rebuild_every_replica_index_and_a_late_mirror_agrees():
    cluster = Cluster(config())
    feed = Feed(cluster)
    early = KvIndexMirror()
    early.apply_snapshot(feed.recorder.snapshot())
    assert early.sequence_number == 0 and early.replicas == {}
    for rid in (1, 2):
        cluster.join(rid, num_blocks=16)
    rng = random.Random(0)
    late: KvIndexMirror | None = None
    for i, prompt in enumerate(shared_prefix_prompts(rng, 24)):
        cluster.submit(f"r{i}", prompt, SamplingParams(max_tokens=6, ignore_eos=True))
    for round_ in range(400):
        ran = [cluster.step(rid) for rid in (1, 2)]
        batch = feed.take()
        if batch is not None:
            assert early.apply(batch)
            if late is not None:
                assert late.apply(batch)
        assert early.indexes() == core_indexes(cluster.scheduler)
        if round_ == 5:  # a subscriber that joins mid-run starts from a snapshot
            late = KvIndexMirror()
            late.apply_snapshot(feed.recorder.snapshot())
            assert late.sequence_number == feed.recorder.sequence_number > 0
        if all(p is None for p in ran) and not cluster.scheduler.has_unfinished():
            break
    assert late is not None and late.indexes() == early.indexes()
    assert feed.numbers == list(range(1, len(feed.numbers) + 1))
    kinds = set(feed.kinds())
    assert {"stored", "removed"} <= kinds, "a pool of 16 blocks must evict"
    assert set(early.indexes()) == {1, 2}


def test_leave_and_reset_clear_a_replica_and_a_late_join_is_caught_up():
    cluster = Cluster(config())
    feed = Feed(cluster)
    mirror = KvIndexMirror()
    mirror.apply_snapshot(feed.recorder.snapshot())
    cluster.join(1, 16)
    rng = random.Random(1)
    for i, prompt in enumerate(shared_prefix_prompts(rng, 4)):
        cluster.submit(f"a{i}", prompt)
    cluster.run()
    # Replica 2 joins and works before the recorder looks: one batch catches both up.
    cluster.join(2, 16)
    for i, prompt in enumerate(shared_prefix_prompts(rng, 4)):
        cluster.submit(f"b{i}", prompt)
    cluster.step(2)
    assert cluster.scheduler.replica(2).blocks.cached_blocks()
    batch = feed.take()
    assert batch is not None and {e.WhichOneof("kind") for e in batch.events} == {"stored"}
    assert mirror.apply(batch)
    assert mirror.indexes() == core_indexes(cluster.scheduler)
    assert set(mirror.indexes()) == {1, 2}
    cluster.run()
    assert mirror.apply(feed.take() or kv_events_pb2.KvEventBatch())

    cluster.scheduler.reset(1)  # the same id, a new (empty) block manager
    batch = feed.take()
    assert batch is not None
    assert [(e.replica_id, e.WhichOneof("kind")) for e in batch.events] == [(1, "cleared")]
    assert mirror.apply(batch) and set(mirror.indexes()) == {2}

    cluster.leave(2)
    batch = feed.take()
    assert batch is not None
    assert [(e.replica_id, e.WhichOneof("kind")) for e in batch.events] == [(2, "cleared")]
    assert mirror.apply(batch) and mirror.indexes() == {} == core_indexes(cluster.scheduler)
    assert feed.numbers == list(range(1, len(feed.numbers) + 1))
    assert feed.take() is None, "nothing changed, nothing is sent"


def test_a_snapshot_lists_every_replica_with_its_blocks_parents_first():
    cluster = Cluster(config())
    feed = Feed(cluster)
    cluster.join(1, 16)
    cluster.join(2, 16)
    prompt = list(range(1, 3 * BS + 2))
    cluster.submit("r", prompt)
    cluster.step(1)
    feed.take()
    snap = feed.recorder.snapshot()
    assert snap.sequence_number == feed.recorder.sequence_number == 3
    one, two = snap.replicas
    assert (one.replica_id, one.block_size, two.replica_id, len(two.blocks)) == (1, BS, 2, 0)
    h = hashes(prompt)
    assert [b.block_hash for b in one.blocks] == h
    assert [b.parent_hash for b in one.blocks] == [b""] + h[:2]
    assert [list(b.token_ids) for b in one.blocks] == [prompt[i : i + BS] for i in (0, 4, 8)]
    cluster.step(1)  # the first output token fills nothing new; events would be pending
    cluster.scheduler.replica(1).blocks.listener(BLOCK_REMOVED, h[2], b"", ())
    with pytest.raises(RuntimeError, match="take"):
        feed.recorder.snapshot()


@pytest.mark.parametrize("seed", range(4))
def test_random_joins_leaves_resets_and_steps_keep_every_mirror_exact(seed):
    rng = random.Random(seed)
    cluster = Cluster(config(max_num_seqs=3))
    feed = Feed(cluster)
    mirrors: list[KvIndexMirror] = []
    next_rid = 1
    n = 0
    for _ in range(300):
        op = rng.random()
        live = list(cluster.workers)
        if op < 0.05 or not live:
            cluster.join(next_rid, rng.choice([16, 20]))
            next_rid += 1
        elif op < 0.08 and len(live) > 1:
            cluster.leave(rng.choice(live))
        elif op < 0.10:
            rid = rng.choice(live)
            cluster.workers[rid].welcome(rid, cluster.scheduler.reset(rid))
        elif op < 0.35:
            for prompt in shared_prefix_prompts(rng, rng.randrange(1, 4), groups=4):
                cluster.submit(f"q{n}", prompt, SamplingParams(max_tokens=rng.randrange(1, 9)))
                n += 1
        else:
            cluster.step(rng.choice(live))
        if rng.random() < 0.5:  # events are not always taken right away
            batch = feed.take()
            if batch is not None:
                for mirror in mirrors:
                    assert mirror.apply(batch)
            for mirror in mirrors:
                assert mirror.indexes() == core_indexes(cluster.scheduler)
        if rng.random() < 0.03:
            batch = feed.take()
            if batch is not None:
                for mirror in mirrors:
                    assert mirror.apply(batch)
            mirrors.append(KvIndexMirror())
            mirrors[-1].apply_snapshot(feed.recorder.snapshot())
    assert feed.numbers == list(range(1, len(feed.numbers) + 1))
    assert mirrors and {"stored", "removed", "cleared"} <= set(feed.kinds())


# -- settings, flags, the listening line ---------------------------------------------------


def test_kv_ports_default_to_off_and_the_snapshot_port_follows_the_events_port():
    assert ServiceSettings().kv_ports is None
    assert ServiceSettings(kv_events_port=5557).kv_ports == (5557, 5558)
    assert ServiceSettings(kv_events_port=0).kv_ports == (0, 0)
    assert ServiceSettings(kv_events_port=5557, kv_snapshot_port=7000).kv_ports == (5557, 7000)
    with pytest.raises(ValueError, match="needs kv_events_port"):
        ServiceSettings(kv_snapshot_port=7000)
    with pytest.raises(ValueError, match=r"kv_snapshot_port must be in 0\.\.65535"):
        ServiceSettings(kv_events_port=65535)
    with pytest.raises(ValueError, match="kv_events_port must be in"):
        ServiceSettings(kv_events_port=-1)


def test_kv_flags_and_their_environment_fallbacks(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGODA_MODEL_CARD", str(tmp_path))
    monkeypatch.delenv("PAGODA_KV_EVENTS_PORT", raising=False)
    monkeypatch.delenv("PAGODA_KV_SNAPSHOT_PORT", raising=False)

    def parse(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        server.add_arguments(parser)
        assert "--kv-events-port" in parser.format_help()
        return parser.parse_args(list(argv))

    args = parse()
    assert (args.kv_events_port, args.kv_snapshot_port) == (None, None)
    args = parse("--kv-events-port", "0")
    assert (args.kv_events_port, args.kv_snapshot_port) == (0, None)
    monkeypatch.setenv("PAGODA_KV_EVENTS_PORT", "6001")
    monkeypatch.setenv("PAGODA_KV_SNAPSHOT_PORT", "6005")
    args = parse()
    assert (args.kv_events_port, args.kv_snapshot_port) == (6001, 6005)
    monkeypatch.setenv("PAGODA_KV_EVENTS_PORT", "")
    monkeypatch.setenv("PAGODA_KV_SNAPSHOT_PORT", "")
    assert parse().kv_events_port is None


def test_the_listening_line_only_grows_at_its_end():
    plain = Addresses("127.0.0.1", 1, 2, 3)
    line = "scheduler listening grpc=127.0.0.1:1 step=127.0.0.1:2 http=127.0.0.1:3"
    assert plain.listening_line() == line
    with_kv = Addresses("::1", 1, 2, 3, 4, 5).listening_line()
    assert with_kv.endswith(" kv_events=[::1]:4 kv_snapshot=[::1]:5")
    assert with_kv.startswith("scheduler listening grpc=[::1]:1 step=[::1]:2 http=[::1]:3 ")
