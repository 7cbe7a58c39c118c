"""The services' ready lines: what a service prints is what a launcher reads back."""

from pagoda.announcements import (
    GATEWAY_LISTENING,
    SCHEDULER_KV_EVENTS,
    SCHEDULER_LISTENING,
    WORKER_REGISTERED,
    Announcement,
)


def test_a_line_reads_back_its_fields_by_name_and_in_order():
    line = SCHEDULER_LISTENING.line(grpc="127.0.0.1:1", step="127.0.0.1:2", http="[::1]:3")
    assert line == "scheduler listening grpc=127.0.0.1:1 step=127.0.0.1:2 http=[::1]:3"
    match = SCHEDULER_LISTENING.search(f"2026-12-06 INFO {line} " + SCHEDULER_KV_EVENTS.line(
        kv_events="h:4", kv_snapshot="h:5"))  # fmt: skip
    assert match is not None
    assert match.groups() == ("127.0.0.1:1", "127.0.0.1:2", "[::1]:3")
    assert match["http"] == "[::1]:3"


def test_a_field_is_one_word_and_literal_text_is_not_a_pattern():
    dotted = Announcement("a.b x={x}")
    assert dotted.search("a.b x=1 y") is not None and dotted.search("a.b x=1 y")["x"] == "1"
    assert dotted.search("aXb x=1") is None
    assert GATEWAY_LISTENING.search("gateway listening http= grpc=h:2") is None


def test_the_worker_line_carries_its_replica_and_epoch():
    line = WORKER_REGISTERED.line(worker_id="w-1", replica=3, epoch=7, http="127.0.0.1:8002")
    match = WORKER_REGISTERED.search(line)
    assert match is not None
    assert (match["worker_id"], match["replica"], match["epoch"]) == ("w-1", "3", "7")
