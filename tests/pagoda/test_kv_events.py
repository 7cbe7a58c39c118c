"""The reading end of the prefix-cache events, with no scheduler: parents-first order, a
mirror that refuses a gap, and a subscriber against a publisher written here from the
wire contract alone (tests/scheduler_svc/test_kv_events*.py run it against the real one)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import zmq

from pagoda.kv_events import BlockIndex, KvEventSubscriber, KvIndexMirror, parents_first
from pagoda.v1 import kv_events_pb2

BS = 4


def batch(*numbers: int) -> kv_events_pb2.KvEventBatch:
    """Events ``numbers``, each storing block ``bytes([n])`` on replica 1, parentless."""
    out = kv_events_pb2.KvEventBatch()
    for n in numbers:
        e = out.events.add(sequence_number=n, replica_id=1, block_size=BS)
        e.stored.block_hash = bytes([n])
        e.stored.token_ids.extend([n] * BS)
    return out


def snapshot(number: int, index: BlockIndex) -> kv_events_pb2.KvSnapshot:
    out = kv_events_pb2.KvSnapshot(sequence_number=number)
    replica = out.replicas.add(replica_id=1, block_size=BS)
    for h in parents_first(index):
        parent, tokens = index[h]
        replica.blocks.add(block_hash=h, parent_hash=parent, token_ids=tokens)
    return out


def test_parents_come_first_and_an_orphan_is_a_root():
    index = {
        b"child-of-c": (b"c", (1,)),  # c not indexed: an orphan
        b"grandchild": (b"child", (2,)),
        b"child": (b"a", (3,)),
        b"a": (b"", (4,)),
    }
    order = parents_first(index)
    assert order.index(b"a") < order.index(b"child") < order.index(b"grandchild")
    assert set(order) == set(index)


def test_a_mirror_refuses_a_gap_skips_what_it_has_and_resyncs_from_a_snapshot():
    mirror = KvIndexMirror()
    assert not mirror.apply(batch(1)), "no snapshot yet"
    mirror.apply_snapshot(kv_events_pb2.KvSnapshot(sequence_number=2))
    assert mirror.apply(batch(1, 2, 3)), "events the snapshot holds are skipped"
    assert set(mirror.replicas[1]) == {bytes([3])}
    assert not mirror.apply(batch(5)) and not mirror.in_sync
    assert set(mirror.replicas[1]) == {bytes([3])}, "a batch after a gap changes nothing"


class Publisher:
    """A PUB and a ROUTER socket speaking the contract, driven by the test."""

    def __init__(self, ctx: zmq.Context):
        self.pub = ctx.socket(zmq.PUB)
        self.router = ctx.socket(zmq.ROUTER)
        host = "tcp://127.0.0.1"
        self.events = f"{host}:{self.pub.bind_to_random_port(host)}"
        self.snapshots = f"{host}:{self.router.bind_to_random_port(host)}"

    def publish(self, message: kv_events_pb2.KvEventBatch) -> None:
        self.pub.send(message.SerializeToString())

    def answer(self, sub: KvEventSubscriber, snap: kv_events_pb2.KvSnapshot) -> None:
        """Heartbeats until ``sub`` asks for a snapshot, then ``snap`` as the answer."""
        deadline = time.monotonic() + 10
        while not self.router.poll(0):
            assert time.monotonic() < deadline, "the subscriber never asked for a snapshot"
            self.publish(kv_events_pb2.KvEventBatch())  # a heartbeat: the subscription is live
            sub.poll(0.05)
        frames = self.router.recv_multipart()
        kv_events_pb2.KvSnapshotRequest.FromString(frames[-1])
        self.router.send_multipart([*frames[:-1], snap.SerializeToString()])

    def close(self) -> None:
        self.pub.close(linger=0)
        self.router.close(linger=0)


@pytest.fixture
def wired() -> Iterator[tuple[Publisher, KvEventSubscriber]]:
    ctx = zmq.Context()
    publisher = Publisher(ctx)
    sub = KvEventSubscriber(publisher.events, publisher.snapshots, context=ctx)
    yield publisher, sub
    sub.close()
    publisher.close()
    ctx.term()


def test_a_subscriber_syncs_from_a_snapshot_and_asks_again_after_a_gap(wired):
    publisher, sub = wired
    publisher.answer(sub, snapshot(2, {b"a": (b"", (1,) * BS), b"b": (b"a", (2,) * BS)}))
    publisher.publish(batch(3))
    assert sub.poll_until(lambda: sub.mirror.sequence_number == 3, 10)
    assert set(sub.mirror.indexes()[1]) == {b"a", b"b", bytes([3])}
    publisher.publish(batch(5))  # event 4 was lost
    assert sub.poll_until(lambda: not sub.mirror.in_sync, 10) and sub.gaps == 1
    publisher.answer(sub, snapshot(5, {bytes([5]): (b"", (5,) * BS)}))
    assert sub.poll_until(lambda: sub.mirror.sequence_number == 5, 10)
    assert sub.mirror.indexes() == {1: {bytes([5]): (b"", (5,) * BS)}}
    assert sub.snapshot_numbers == [2, 5]
