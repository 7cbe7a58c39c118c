"""The worker's DEALERs to the scheduler's step ROUTER, and reading what comes back.

Two DEALERs dial the scheduler: ``<worker_id>/main`` for the main thread
(``Connection``) and ``<worker_id>/hb`` for the heartbeat thread, since a ZeroMQ socket
belongs to one thread. Both queue messages only to a live connection (``IMMEDIATE``):
a result or a beat meant for a scheduler that died is worthless to the next one, and a
pile of queued Hellos would make a restarted scheduler register the worker many times
over.
"""

from __future__ import annotations

import logging

import zmq
from google.protobuf.message import DecodeError
from zmq.utils.monitor import recv_monitor_message

from pagoda.v1 import step_pb2

log = logging.getLogger("pagoda.worker")

# How long both loops wait on their sockets before looking at their flags again.
POLL_S = 0.1
# Transport-level keepalive of both DEALERs (see dealer).
ZMTP_PING_MS = 2000
ZMTP_TIMEOUT_MS = 6000


class Connection:
    """The main DEALER, its monitor and their poller.

    A Hello that goes out again goes out on a new connection. One sent into a connection
    whose link is down (no error: TCP has not noticed) waits in its queue, and when the
    link heals it arrives together with every later one, each registering a new replica
    and ending the one before. Closing the old socket (linger 0) drops what it queued;
    the scheduler's ROUTER hands this worker's identity over to the new connection.
    """

    def __init__(self, ctx: zmq.Context, address: str, identity: str) -> None:
        self._ctx, self._address, self._identity = ctx, address, identity
        self._open()

    def _open(self) -> None:
        self.sock = dealer(self._ctx, self._address, self._identity)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.carried_hello = False

    def renew(self) -> None:
        """Drop this connection and whatever it still queues; dial again."""
        self.close(linger_ms=0)
        self._open()

    def close(self, *, linger_ms: int) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=linger_ms)


def dropped(monitor: zmq.Socket) -> bool:
    """Read the monitor's events; True when the connection dropped among them."""
    seen = False
    while True:
        try:
            event = recv_monitor_message(monitor, zmq.NOBLOCK)
        except zmq.Again:
            return seen
        seen |= event["event"] == zmq.EVENT_DISCONNECTED


def dealer(ctx: zmq.Context, address: str, identity: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.LINGER, 0)
    # ZMTP pings notice a peer that vanished without closing its connection (a dead host);
    # the libzmq I/O thread answers them, so a long step in this process never trips them.
    sock.setsockopt(zmq.HEARTBEAT_IVL, ZMTP_PING_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMTP_TIMEOUT_MS)
    if address.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)
    sock.connect(address)
    return sock


def parse(frames: list[bytes]) -> step_pb2.SchedulerMessage | None:
    """The message in the last frame (a ROUTER may put an empty delimiter before it)."""
    msg = step_pb2.SchedulerMessage()
    try:
        msg.ParseFromString(frames[-1])
    except DecodeError as exc:
        log.warning("dropping an undecodable message from the scheduler: %s", exc)
        return None
    return msg
