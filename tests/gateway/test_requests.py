"""The fan-out of step outputs to requests, without a network: RequestTable and groups."""

from __future__ import annotations

import asyncio
import time

import grimp
import pytest

from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.requests import ActiveRequest, RequestGroup, RequestTable
from pagoda.sampling_params import SamplingParams
from pagoda.text import Tokenizer
from pagoda.v1 import common_pb2, session_pb2

STOP = common_pb2.FINISH_REASON_STOP


def _table() -> tuple[RequestTable, list[session_pb2.GatewayMessage]]:
    sent: list[session_pb2.GatewayMessage] = []
    table = RequestTable(Metrics("m"))
    table.attach(sent.append)
    return table, sent


def _request(tokenizer: Tokenizer, rid: str = "r", **params: object) -> ActiveRequest:
    return ActiveRequest.create(
        rid, tokenizer.encode("Hi"), SamplingParams(**params), tokenizer, asyncio.Event()
    )


def _outputs(rid: str, tokens: dict[int, int], finished: tuple[int, ...] = ()) -> object:
    out = session_pb2.StepOutputs(
        request_ids=[rid] * len(tokens), indices=list(tokens), token_ids=list(tokens.values())
    )
    for index in finished:
        out.finished.append(
            session_pb2.SequenceFinished(
                request_id=rid, index=index, reason=STOP, stop_token_id=2, num_cached_tokens=3
            )
        )
    return out


def test_a_stop_string_finishes_one_sample_at_the_scheduler_and_not_its_sibling(
    tokenizer: Tokenizer, scripts: list[list[int]]
) -> None:
    table, sent = _table()
    request = _request(tokenizer, n=2, stop=["Done"])
    table.add(request)
    for a, b in zip(scripts[0], scripts[1], strict=False):
        table.on_outputs(_outputs("r", {0: a, 1: b}))
    finishes = [m.finish for m in sent if m.WhichOneof("kind") == "finish"]
    assert [(f.request_id, f.index, f.reason) for f in finishes] == [("r", 0, STOP)]
    first, second = request.samples
    assert first.finish_reason == "stop" and first.text == " The answer is 42. "
    assert len(first.token_ids) < len(scripts[0])  # tokens after the stop were dropped
    assert not second.finished and request.wake.is_set()
    table.on_outputs(_outputs("r", {1: 2}, finished=(1,)))
    assert request.done and len(table) == 0 and request.num_cached_tokens == 3
    assert second.finish_reason == "stop" and second.stop_reason == 2


def test_late_tokens_of_an_aborted_request_are_ignored(tokenizer: Tokenizer) -> None:
    table, sent = _table()
    request = _request(tokenizer)
    table.add(request)
    table.abort(request)
    table.on_outputs(_outputs("r", {0: 40}))
    assert request.samples[0].token_ids == []
    assert [m.abort.request_id for m in sent] == ["r"]


def test_a_rejection_fails_the_request_with_its_status(tokenizer: Tokenizer) -> None:
    table, _ = _table()
    request = _request(tokenizer)
    table.add(request)
    table.on_rejected(
        session_pb2.Rejected(
            request_id="r", reason=session_pb2.Rejected.QUEUE_FULL, message="full", retry_after_s=3
        )
    )
    assert request.error is not None and request.error.status == 429
    assert request.error.headers() == {"Retry-After": "3"} and len(table) == 0


def test_a_group_streams_deltas_and_raises_a_failure(tokenizer: Tokenizer) -> None:
    async def scenario() -> tuple[list[str], int]:
        table, _ = _table()
        wake = asyncio.Event()
        requests = [
            ActiveRequest.create(rid, [1, 5], SamplingParams(), tokenizer, wake)
            for rid in ("a", "b")
        ]
        for r in requests:
            table.add(r)
        group = RequestGroup(requests, wake)
        texts: list[str] = []

        async def feed() -> None:
            for token in tokenizer.encode(" hello", add_special_tokens=False):
                table.on_outputs(_outputs("a", {0: token}))
                await asyncio.sleep(0)
            table.on_outputs(_outputs("a", {}, finished=(0,)))
            table.fail_all(GatewayError(503, "gone"))

        feeder = asyncio.ensure_future(feed())
        with pytest.raises(GatewayError) as caught:
            async for batch in group.deltas():
                texts.extend(d.text for p, d in batch if p == 0)
        await feeder
        return texts, caught.value.status

    texts, status = asyncio.run(scenario())
    assert "".join(texts) == " hello" and status == 503


def _aborted_by_scheduler(rid: str, index: int = 0) -> session_pb2.StepOutputs:
    out = session_pb2.StepOutputs()
    out.finished.append(
        session_pb2.SequenceFinished(
            request_id=rid, index=index, reason=common_pb2.FINISH_REASON_ABORT
        )
    )
    return out


def test_a_sequence_the_scheduler_aborted_fails_its_request_and_ends_its_siblings(
    tokenizer: Tokenizer,
) -> None:
    """The scheduler drops queued requests when it drains: a retryable 503, never a
    cut-off answer that looks whole; the siblings are aborted at the scheduler."""
    table, sent = _table()
    request = _request(tokenizer, n=2)
    table.add(request)
    table.on_outputs(_outputs("r", {0: 40, 1: 41}))
    table.on_outputs(_aborted_by_scheduler("r", 1))
    assert request.error is not None and request.error.status == 503
    assert request.error.retry_after_s and len(table) == 0
    assert [m.abort.request_id for m in sent if m.WhichOneof("kind") == "abort"] == ["r"]


def test_a_sequence_that_failed_inside_the_server_fails_its_request_with_a_500(
    tokenizer: Tokenizer,
) -> None:
    table, sent = _table()
    request = _request(tokenizer, n=2)
    table.add(request)
    table.on_outputs(_outputs("r", {0: 40, 1: 41}))
    out = _outputs("r", {0: 42})
    out.finished.add(request_id="r", index=1, reason=common_pb2.FINISH_REASON_ERROR)
    table.on_outputs(out)
    assert request.error is not None and request.error.status == 500
    assert [m.abort.request_id for m in sent if m.WhichOneof("kind") == "abort"] == ["r"]
    assert len(table) == 0 and request.wake.is_set()


def test_a_scheduler_abort_at_the_deadline_is_a_504(tokenizer: Tokenizer) -> None:
    table, _ = _table()
    request = _request(tokenizer)
    request.deadline, request.timeout_s = time.monotonic() + 0.2, 5.0
    table.add(request)
    table.on_outputs(_aborted_by_scheduler("r"))
    assert request.error is not None and request.error.status == 504
    assert request.error.body()["error"]["code"] == "deadline_exceeded"


def test_an_expired_request_is_aborted_at_the_scheduler_and_late_tokens_dropped(
    tokenizer: Tokenizer,
) -> None:
    table, sent = _table()
    request = _request(tokenizer)
    table.add(request)
    table.expire(request, GatewayError(504, "late"))
    table.on_outputs(_outputs("r", {0: 40}))
    assert request.error is not None and request.error.status == 504
    assert request.samples[0].token_ids == [] and len(table) == 0
    assert [m.abort.request_id for m in sent] == ["r"]


def test_the_last_tokens_reach_a_consumer_that_was_busy_when_they_arrived(
    tokenizer: Tokenizer,
) -> None:
    """A slow client holds one batch while the request's last token and its finish
    arrive: its next read must still get them (and the finish reason)."""

    async def scenario() -> tuple[list[int], list[str | None]]:
        table, _ = _table()
        wake = asyncio.Event()
        request = ActiveRequest.create("r", [1, 5], SamplingParams(), tokenizer, wake)
        table.add(request)
        group = RequestGroup([request], wake)
        deltas = group.deltas()
        table.on_outputs(_outputs("r", {0: 40}))
        first = await anext(deltas)  # the consumer now holds this batch ...
        table.on_outputs(_outputs("r", {0: 41}))  # ... while the request finishes
        table.on_outputs(_outputs("r", {0: 2}, finished=(0,)))
        rest = [batch async for batch in deltas]
        got = [d for batch in [first, *rest] for _, d in batch]
        return [t for d in got for t in d.token_ids], [d.finish_reason for d in got]

    tokens, reasons = asyncio.run(scenario())
    assert tokens == [40, 41, 2] and reasons[-1] == "stop"


def test_the_metrics_know_nothing_of_the_request_table() -> None:
    """They read a finished-request record, so the two modules import one way only (an
    import made for type checking counts too)."""
    chain = grimp.build_graph("gateway").find_shortest_chain(
        importer="gateway.metrics", imported="gateway.requests"
    )
    assert chain is None
