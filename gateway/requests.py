"""The gateway's requests in flight, and the fan-out of each step's outputs to them.

One session carries every request of this gateway, and the scheduler sends one
``StepOutputs`` per step for all of them. ``RequestTable.on_outputs`` applies such a
message with ``pagoda.text.request_state.apply_step``, the code the offline engine
uses too (tokens, text, stop strings, logprobs, final records); what stays here is
the gateway's part: a sample that completed a stop string is finished at the
scheduler (its siblings go on), finished requests are counted in the metrics, and
every request that advanced is woken once — through an ``asyncio.Event`` that its API
handler waits on, so a slow client coalesces several steps into one read instead of
growing a queue.

A request ends in one of four ways besides finishing: its client goes away
(``abort``), its deadline passes (``expire``: aborted at the scheduler, answered 504),
the scheduler ends it without being asked (a ``FINISH_REASON_ABORT`` record: its
deadline passed there first, or it dropped its queue while shutting down), or its
generation fails inside the server (a ``FINISH_REASON_ERROR`` record: 500).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from gateway import errors
from gateway.errors import GatewayError
from gateway.metrics import FinishedRequest, Metrics
from pagoda.sampling_params import SamplingParams
from pagoda.text import SampleDelta, Tokenizer
from pagoda.text.request_state import Failure, RequestState, apply_step
from pagoda.v1 import common_pb2, session_pb2

log = logging.getLogger(__name__)

Send = Callable[[session_pb2.GatewayMessage], None]


@dataclass(eq=False, kw_only=True)
class ActiveRequest(RequestState):
    """A request's state, and what the gateway adds: its wake-up, times and deadline."""

    wake: asyncio.Event
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    error: GatewayError | None = None
    # When the request's deadline passes (time.monotonic()), and the timeout it came from.
    deadline: float | None = None
    timeout_s: float | None = None

    @classmethod
    def create(
        cls,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        wake: asyncio.Event,
    ) -> ActiveRequest:
        return cls.start(request_id, prompt_token_ids, params, tokenizer, wake=wake)

    @property
    def over(self) -> bool:
        """Nothing more will happen to it: finished or failed."""
        return self.error is not None or self.done

    def fail(self, error: GatewayError) -> None:
        if not self.over:
            self.error = error
            self.wake.set()

    def finished_record(self, now: float) -> FinishedRequest:
        """What the metrics read of it once every sample has ended."""
        return FinishedRequest(
            finish_reasons=[s.finish_reason or "abort" for s in self.samples],
            prompt_tokens=len(self.prompt_token_ids),
            generation_tokens=self.completion_tokens,
            longest_sample=max(len(s.token_ids) for s in self.samples),
            arrival=self.arrival,
            first_token_at=self.first_token_at,
            last_token_at=self.last_token_at,
            finished_at=now,
        )


@dataclass(eq=False)
class RequestGroup:
    """The requests of one API call (one per prompt), woken by one shared event."""

    requests: list[ActiveRequest]
    wake: asyncio.Event
    # Fires at the group's deadline; cancelled when the caller releases the group.
    timer: asyncio.TimerHandle | None = None

    @property
    def done(self) -> bool:
        return all(r.done for r in self.requests)

    def _raise_error(self) -> None:
        for r in self.requests:
            if r.error is not None:
                raise r.error

    async def deltas(self) -> AsyncIterator[list[tuple[int, SampleDelta]]]:
        """Yields (request position, delta) lists as samples advance; ends when all have
        finished, raises the ``GatewayError`` of a request that failed."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            self._raise_error()
            # Read before taking: tokens that arrive while the consumer holds a batch
            # (the request may finish meanwhile) are taken on the next turn, not lost.
            done = self.done
            batch = [(i, d) for i, r in enumerate(self.requests) for d in r.take_deltas()]
            if batch:
                yield batch
            if done:
                return

    async def wait(self) -> None:
        """Until every sample has finished; raises the error of a request that failed."""
        while True:
            self._raise_error()
            if self.done:
                return
            await self.wake.wait()
            self.wake.clear()


class RequestTable:
    """Requests in flight on the session, by request id."""

    def __init__(self, metrics: Metrics) -> None:
        self._active: dict[str, ActiveRequest] = {}
        self._metrics = metrics
        self._send: Send | None = None

    def __len__(self) -> int:
        return len(self._active)

    def attach(self, send: Send | None) -> None:
        """Where finish and abort messages go (None while no session is open)."""
        self._send = send

    def add(self, request: ActiveRequest) -> None:
        if request.request_id in self._active:
            raise errors.invalid(f"request id {request.request_id!r} is already in use")
        self._active[request.request_id] = request

    def abort(self, request: ActiveRequest) -> None:
        """The client went away: end the request at the scheduler, at once."""
        if self._drop(request):
            self._metrics.request_aborted()

    def expire(self, request: ActiveRequest, error: GatewayError) -> None:
        """The request's deadline passed: end it at the scheduler (its blocks are freed at
        once) and fail it here with ``error``."""
        if self._drop(request):
            self._metrics.request_timed_out()
        request.fail(error)

    def _drop(self, request: ActiveRequest) -> bool:
        """Forget a request and abort it at the scheduler; False if it was not in flight."""
        if self._active.pop(request.request_id, None) is None:
            return False
        self._send_quietly(
            session_pb2.GatewayMessage(abort=session_pb2.Abort(request_id=request.request_id))
        )
        return True

    def fail_all(self, error: GatewayError) -> None:
        """The session broke: every request in flight ends with ``error``."""
        active, self._active = self._active, {}
        for request in active.values():
            request.fail(error)

    def on_update(self, update: session_pb2.SchedulerUpdate) -> None:
        kind = update.WhichOneof("kind")
        if kind == "outputs":
            self.on_outputs(update.outputs)
        elif kind == "rejected":
            self.on_rejected(update.rejected)

    def on_rejected(self, rejected: session_pb2.Rejected) -> None:
        request = self._active.pop(rejected.request_id, None)
        if request is not None:
            request.fail(errors.from_rejection(rejected))

    def on_outputs(self, outputs: session_pb2.StepOutputs) -> None:
        """Apply one step (``pagoda.text.apply_step``), then do what it asks of the
        gateway: finish stopped samples at the scheduler, fail a request whose sequence
        failed and abort its siblings, count finished requests; wake each request once."""
        now = time.monotonic()
        active = self._active
        for rid, report in apply_step(outputs, active).items():
            request = active[rid]
            if report.got_tokens:
                if request.first_token_at is None:
                    request.first_token_at = now
                request.last_token_at = now
            for index in report.stopped:
                self._finish_at_scheduler(rid, index)
            if report.failure is not None:
                request.fail(_failure_error(request, report.failure))
            if request.done:
                del active[rid]
                self._metrics.request_finished(request.finished_record(now))
            elif request.error is not None:  # a sequence failed: end its siblings too
                self._drop(request)
            request.wake.set()

    def _finish_at_scheduler(self, request_id: str, index: int) -> None:
        self._send_quietly(
            session_pb2.GatewayMessage(
                finish=session_pb2.FinishSequence(
                    request_id=request_id, index=index, reason=common_pb2.FINISH_REASON_STOP
                )
            )
        )

    def _send_quietly(self, message: session_pb2.GatewayMessage) -> None:
        """Finish and abort are best effort: a broken session aborts everything anyway."""
        if self._send is None:
            return
        with contextlib.suppress(GatewayError):
            self._send(message)


# A scheduler abort this close to the request's own deadline is that deadline passing at
# the scheduler first (the two clocks and the two timers never agree to the millisecond).
DEADLINE_SLACK_S = 1.0


def _failure_error(request: ActiveRequest, failure: Failure) -> GatewayError:
    if failure.reason == "error":
        return errors.internal("generation failed inside the server")
    # This gateway never finishes a sequence with ABORT (an abort it sends gets no answer),
    # so the scheduler ended it: a client must not take the cut-off text for a whole answer.
    return _scheduler_abort_error(request)


def _scheduler_abort_error(request: ActiveRequest) -> GatewayError:
    """504 when the request's deadline has (about) passed, else a retryable 503."""
    deadline, timeout_s = request.deadline, request.timeout_s
    near = deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK_S
    if near and timeout_s is not None:
        return errors.deadline_exceeded(timeout_s)
    return errors.dropped_by_scheduler()
