"""The heartbeat thread: beats on a DEALER of its own while the main thread computes.

Torch releases the GIL inside its ops, so beats keep flowing while a long step holds the
main thread, and a silent scheduler is noticed even then. The thread only reads the
registration (``Link``) and raises a flag; registering again is the main loop's job.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import zmq

from pagoda.v1 import step_pb2
from worker_svc.connection import POLL_S, dealer, parse


@dataclass
class Link:
    """The registration, shared between the main thread (writer) and the heartbeat thread."""

    replica_id: int = 0
    epoch: int = 0
    last_step: int = 0
    interval_s: float = 1.0
    timeout_s: float = 10.0


class Heartbeat(threading.Thread):
    """Beats on a socket of its own and tells the main loop when the scheduler falls silent.

    Silence (no answer for the timeout) sets ``silence``; the main loop then registers
    again, since a scheduler that restarted has forgotten this worker. The timer starts
    over after each alarm, so a scheduler that stays away is asked once per timeout.
    """

    def __init__(self, ctx: zmq.Context, address: str, identity: str, link: Link, worker_id: str):
        super().__init__(name="heartbeat", daemon=True)
        self._ctx, self._address, self._identity = ctx, address, identity
        self._link, self._worker_id = link, worker_id
        self.silence = threading.Event()
        self._halt = threading.Event()  # not _stop: threading.Thread has a method of that name
        self.last_tick = time.monotonic()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        sock = dealer(self._ctx, self._address, self._identity)
        try:
            self._beat(sock)
        finally:
            sock.close(linger=0)

    def _beat(self, sock: zmq.Socket) -> None:
        """Beat every interval (a new interval from a Welcome applies to the next beat);
        a beat that finds no connection is retried soon, not an interval later."""
        link = self._link
        last_answer = time.monotonic()
        last_sent, retry_at = float("-inf"), 0.0
        while not self._halt.is_set():
            now = self.last_tick = time.monotonic()
            if now >= max(last_sent + link.interval_s, retry_at):
                if self._send(sock):
                    last_sent = now
                else:
                    retry_at = now + POLL_S
            if now - last_answer > link.timeout_s:
                self.silence.set()
                last_answer = now
            next_beat = max(last_sent + link.interval_s, retry_at)
            wait = min(max(next_beat - now, 0.0), POLL_S)
            if sock.poll(wait * 1000) and self._drain_answers(sock):
                last_answer = time.monotonic()

    def _send(self, sock: zmq.Socket) -> bool:
        link = self._link
        beat = step_pb2.Heartbeat(
            worker_id=self._worker_id,
            replica_id=link.replica_id,
            epoch=link.epoch,
            last_step=link.last_step,
        )
        try:
            sock.send(step_pb2.WorkerMessage(heartbeat=beat).SerializeToString(), zmq.NOBLOCK)
            return True
        except zmq.Again:  # not connected yet, or no longer
            return False

    def _drain_answers(self, sock: zmq.Socket) -> bool:
        """Read everything waiting; True when a heartbeat answer was among it."""
        answered = False
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return answered
            msg = parse(frames)
            answered |= msg is not None and msg.WhichOneof("kind") == "heartbeat"
