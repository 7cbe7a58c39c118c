"""The global waiting queue, and the deadlines of requests.

Sequences wait in one queue, FCFS by arrival or (the priority policy) by priority
then arrival, until some replica admits them. The queue is a heap with lazy
deletion: a sequence taken out from behind the head (admitted past one left for
another replica, or ended while waiting) leaves a stale entry that is skipped and
dropped on reaching the top, so that taking one out never searches the heap. The counts
of waiting sequences and tokens, which bound the queue (``QueueFull``), are kept
here and nowhere else.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Mapping
from typing import Literal

from scheduler_svc.sequence import Request, Sequence, Status

SortKey = tuple[int, float, int]


class QueueFull(ValueError):
    """The waiting queue is at one of its bounds; the same submit may succeed later."""


class RequestQueue:
    """Waiting sequences in queue order, with their count and their tokens."""

    def __init__(
        self,
        policy: Literal["fcfs", "priority"],
        max_seqs: int | None = None,
        max_tokens: int | None = None,
    ):
        self.policy = policy
        self.max_seqs = max_seqs
        self.max_tokens = max_tokens
        # (sort_key, entry, seq): an entry is live while its sequence waits and names it
        # as its ``queue_entry``.
        self._heap: list[tuple[SortKey, int, Sequence]] = []
        self._next_entry = 1
        self.num_seqs = 0
        # Tokens of the waiting sequences (prompt, plus the output of those waiting to
        # resume): what ``max_tokens`` bounds.
        self.num_tokens = 0

    def sort_key(self, priority: int, arrival: float, seq_id: int) -> SortKey:
        """A sequence's place in the queue, and its rank as a preemption victim (the
        largest goes first). The FCFS policy ignores the priority."""
        return (priority if self.policy == "priority" else 0, arrival, seq_id)

    def check_room(self, num_seqs: int, num_tokens: int) -> None:
        """Raise QueueFull unless the queue can take ``num_seqs`` more sequences holding
        ``num_tokens`` tokens; ValueError when it never could, however empty."""
        bounds = [
            (bound, now, more, what)
            for bound, now, more, what in (
                (self.max_seqs, self.num_seqs, num_seqs, "sequences"),
                (self.max_tokens, self.num_tokens, num_tokens, "prompt tokens"),
            )
            if bound is not None
        ]
        for bound, _, more, what in bounds:
            if more > bound:
                raise ValueError(
                    f"the request needs {more} {what} in the waiting queue, which holds "
                    f"at most {bound}"
                )
        for bound, now, more, what in bounds:
            if now + more > bound:
                raise QueueFull(
                    f"the waiting queue is full ({now} {what} waiting, at most {bound}); "
                    "retry later"
                )

    def push(self, seq: Sequence) -> None:
        """Queue a sequence (new, or back from a replica); it starts a new affinity wait."""
        seq.status = Status.WAITING
        seq.passed_over_at = None
        entry = seq.queue_entry = self._next_entry
        self._next_entry += 1
        heapq.heappush(self._heap, (seq.sort_key, entry, seq))
        self.num_seqs += 1
        self.num_tokens += len(seq.token_ids)

    def take(self, seq: Sequence) -> None:
        """Take a waiting sequence out to admit it; the head's entry is dropped at once."""
        self.discard(seq)
        heap = self._heap
        if heap and heap[0][2] is seq:
            heapq.heappop(heap)

    def discard(self, seq: Sequence) -> None:
        """Take a waiting sequence out (it ended); its entry goes stale, skipped later."""
        seq.queue_entry = 0
        self.num_seqs -= 1
        self.num_tokens -= len(seq.token_ids)

    def peek(self) -> Sequence | None:
        """The head of the queue, dropping the stale entries above it."""
        heap = self._heap
        while heap:
            _, entry, seq = heap[0]
            if seq.status is Status.WAITING and seq.queue_entry == entry:
                return seq
            heapq.heappop(heap)
        return None

    def __iter__(self) -> Iterator[Sequence]:
        """Every waiting sequence, in no particular order."""
        for _, entry, seq in self._heap:
            if seq.status is Status.WAITING and seq.queue_entry == entry:
                yield seq

    def in_order(self) -> Iterator[Sequence]:
        """Waiting sequences in queue order, for admission: the head while each one is
        taken; once one is left waiting (prefix affinity), a sorted copy of the rest."""
        while (seq := self.peek()) is not None:
            yield seq
            if seq.status is Status.WAITING:
                break
        else:
            return
        passed = seq
        for _, entry, later in sorted(self._heap):
            live = later.status is Status.WAITING and later.queue_entry == entry
            if live and later is not passed:
                yield later

    def check_invariants(self) -> None:
        """Raise AssertionError unless the counts match the live entries."""
        waiting = list(self)
        assert len(waiting) == len({s.seq_id for s in waiting}) == self.num_seqs
        assert sum(len(s.token_ids) for s in waiting) == self.num_tokens
        for seq in waiting:
            assert seq.replica_id is None and seq.num_computed_tokens == 0


class Deadlines:
    """Requests with a deadline, waiting or running, the earliest first.

    A heap of (deadline_unix_ms, first seq id, request); the entry of a request that
    ended before its deadline is skipped (``requests``, the scheduler's live requests,
    says which are still on), and such entries are dropped once they are most of it.
    """

    def __init__(self, requests: Mapping[tuple[str, str], Request]):
        self._requests = requests
        self._heap: list[tuple[int, int, Request]] = []

    def push(self, request: Request) -> None:
        heap = self._heap
        if len(heap) > 64 and len(heap) > 2 * len(self._requests):
            heap[:] = [e for e in heap if self._is_live(e[2])]
            heapq.heapify(heap)
        first = request.sequences[0].seq_id
        heapq.heappush(heap, (request.deadline_unix_ms, first, request))

    def due(self, now_unix_ms: int) -> Iterator[Request]:
        """Take out the live requests whose deadline is at or before ``now_unix_ms``."""
        heap = self._heap
        while heap and heap[0][0] <= now_unix_ms:
            _, _, request = heapq.heappop(heap)
            if self._is_live(request):
                yield request

    def check_invariants(self) -> None:
        """Raise AssertionError unless every live request with a deadline has an entry."""
        held = {id(r) for _, _, r in self._heap}
        for request in self._requests.values():
            assert not request.deadline_unix_ms or id(request) in held

    def _is_live(self, request: Request) -> bool:
        return self._requests.get(request.key) is request
