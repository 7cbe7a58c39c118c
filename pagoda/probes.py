"""The HTTP port every service serves for probes: ``/health``, ``/ready``, ``/metrics``.

Kubernetes probes and Prometheus scrape it. The server runs in a daemon thread of
its own so that it answers while the service's main loop is busy (a long model
step in a worker); ``/health`` is therefore a judgement the service makes about its
own loops (a callback), never "the HTTP thread is alive". Torch-free: the scheduler
and the worker use it alike (the gateway serves the same paths on its FastAPI app).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class ProbeServer:
    """Serves the three probe paths from callbacks; ``port=0`` picks a free port."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        health: Callable[[], bool],
        ready: Callable[[], bool],
        registry: CollectorRegistry,
        before_scrape: Callable[[], None] | None = None,
    ):
        self._health, self._ready = health, ready
        self._registry, self._before_scrape = registry, before_scrape
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="probes", daemon=True
        )

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> ProbeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, path: str) -> tuple[int, str, bytes]:
        if path == "/health":
            ok = self._health()
            return (200 if ok else 503), "text/plain", b"ok\n" if ok else b"unhealthy\n"
        if path == "/ready":
            ok = self._ready()
            return (200 if ok else 503), "text/plain", b"ready\n" if ok else b"not ready\n"
        if path == "/metrics":
            if self._before_scrape is not None:
                self._before_scrape()
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        return 404, "text/plain", b"not found\n"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        probes = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                try:
                    status, kind, body = probes._answer(self.path.split("?", 1)[0])
                except Exception as exc:  # a failing callback is an unhealthy answer
                    status, kind, body = 500, "text/plain", f"{exc}\n".encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # probes every few seconds would flood the service's log

        return Handler
