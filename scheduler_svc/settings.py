"""Settings of the scheduler service shell: addresses, liveness timings, drain grace.

The policy's own settings live in ``scheduler_svc.config.SchedulerConfig``; these are
the ones only a process with sockets needs.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

# A gateway that falls this many messages behind (about 4096 steps) is cut off: the step
# loop never waits for a slow gateway.
DEFAULT_SESSION_QUEUE_SIZE = 4096


@dataclass(frozen=True)
class ServiceSettings:
    """Where the scheduler listens and how patiently it waits for workers and gateways."""

    host: str = "127.0.0.1"
    grpc_port: int = 50061
    step_port: int = 50062
    http_port: int = 8001
    # Workers must present it whenever it is set; required when binding beyond loopback.
    shared_secret: str = ""
    heartbeat_interval_ms: int = 1000
    heartbeat_timeout_ms: int = 5000
    step_timeout_s: float = 60.0
    stall_timeout_s: float = 30.0
    drain_grace_s: float = 30.0
    session_queue_size: int = DEFAULT_SESSION_QUEUE_SIZE

    def __post_init__(self) -> None:
        for name in ("grpc_port", "step_port", "http_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in 0..65535, got {port}")
        if self.heartbeat_interval_ms < 1:
            raise ValueError("heartbeat_interval_ms must be >= 1")
        if self.heartbeat_timeout_ms <= self.heartbeat_interval_ms:
            raise ValueError(
                f"heartbeat_timeout_ms ({self.heartbeat_timeout_ms}) must exceed "
                f"heartbeat_interval_ms ({self.heartbeat_interval_ms})"
            )
        for name in ("step_timeout_s", "stall_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.drain_grace_s < 0:
            raise ValueError(f"drain_grace_s must be >= 0, got {self.drain_grace_s}")
        if self.session_queue_size < 1:
            raise ValueError("session_queue_size must be >= 1")
        if not self.shared_secret and not is_loopback(self.host):
            raise ValueError(
                f"binding the step port on {self.host} (beyond loopback) needs a shared secret: "
                "pass --shared-secret or set PAGODA_SHARED_SECRET"
            )


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach; any other name counts as open."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
