"""Settings of the scheduler service shell: addresses, liveness timings, drain grace,
the default request timeout.

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
    # A deadline for submits that carry none, in seconds from their arrival; 0: none.
    request_timeout_s: float = 0.0
    session_queue_size: int = DEFAULT_SESSION_QUEUE_SIZE
    # Prefix-cache events (scheduler_svc.kv_events): None publishes none, 0 is any free port.
    kv_events_port: int | None = None
    # The snapshot port; None: kv_events_port + 1 (any free port when that is 0).
    kv_snapshot_port: int | None = None

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
        for name in ("drain_grace_s", "request_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.session_queue_size < 1:
            raise ValueError("session_queue_size must be >= 1")
        if not self.shared_secret and not is_loopback(self.host):
            raise ValueError(
                f"binding the step port on {self.host} (beyond loopback) needs a shared secret: "
                "pass --shared-secret or set PAGODA_SHARED_SECRET"
            )
        if self.kv_snapshot_port is not None and self.kv_events_port is None:
            raise ValueError("kv_snapshot_port needs kv_events_port (the events' port)")
        kv_ports = self.kv_ports
        if kv_ports is not None:
            for name, port in zip(("kv_events_port", "kv_snapshot_port"), kv_ports, strict=True):
                if not 0 <= port <= 65535:
                    raise ValueError(f"{name} must be in 0..65535, got {port}")

    @property
    def kv_ports(self) -> tuple[int, int] | None:
        """(events, snapshot) ports of the prefix-cache events, or None when not published."""
        if self.kv_events_port is None:
            return None
        if self.kv_snapshot_port is not None:
            return self.kv_events_port, self.kv_snapshot_port
        return self.kv_events_port, (self.kv_events_port + 1 if self.kv_events_port else 0)


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
