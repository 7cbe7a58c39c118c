"""CPU of one step's round trip on the scheduler's side of the step port, two ways.

A ROUTER on uvloop sends a 2 KB plan to a DEALER in another process, which waits 2 ms
(the step) and answers 300 bytes, N times. ``asyncio`` reads with zmq.asyncio's
futures (what the scheduler did), ``reader`` with ``loop.add_reader`` on the socket's
descriptor and a drain of plain non-blocking receives (what it does now). Printed: the
ROUTER process's CPU per round trip, its ZeroMQ I/O thread included.

    .venv/bin/python bench/step_port_read.py            # both, alternated, 3 times
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import uvloop
import zmq
import zmq.asyncio

ROUND_TRIPS = 5000
PLAN = b"p" * 2000
RESULT = b"r" * 300


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def dealer(address: str) -> None:
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(address)
    sock.send(b"hello")
    while sock.recv() != b"stop":
        time.sleep(0.002)
        sock.send(RESULT)


async def router(mode: str) -> float:
    """Seconds of CPU per round trip."""
    ctx = zmq.asyncio.Context() if mode == "asyncio" else zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    peer = subprocess.Popen([sys.executable, __file__, "--dealer", f"tcp://127.0.0.1:{port}"])
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[list[bytes]] = loop.create_future()

    def drain() -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            pending.set_result(frames)

    async def receive() -> list[bytes]:
        nonlocal pending
        if mode == "asyncio":
            return await sock.recv_multipart()
        frames = await pending
        pending = loop.create_future()
        return frames

    def send(identity: bytes) -> None:
        if mode == "asyncio":
            sock.send_multipart([identity, PLAN], zmq.NOBLOCK)
            return
        sock.send_multipart([identity, PLAN], zmq.NOBLOCK)
        if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            loop.call_soon(drain)

    if mode == "reader":
        loop.add_reader(sock.getsockopt(zmq.FD), drain)
        drain()
    identity, _ = await receive()
    start = cpu_seconds()
    for _ in range(ROUND_TRIPS):
        send(identity)
        identity, _ = await receive()
    used = cpu_seconds() - start
    sock.send_multipart([identity, b"stop"])
    peer.wait()
    if mode == "reader":
        loop.remove_reader(sock.getsockopt(zmq.FD))
    sock.close(linger=0)
    return used / ROUND_TRIPS


def main() -> int:
    if sys.argv[1:2] == ["--dealer"]:
        dealer(sys.argv[2])
        return 0
    for _ in range(3):
        for mode in ("asyncio", "reader"):
            per = uvloop.run(router(mode))
            print(f"{mode:8s} {per * 1e6:6.1f} us of CPU per round trip", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
