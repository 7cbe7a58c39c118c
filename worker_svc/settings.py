"""Settings of the worker service shell: where the scheduler is, the worker's name, and
how patiently it registers and drains; and what the worker holds, as its Hello says.

The server fills them from flags and the environment; the runner's own settings (model,
cache, backend) never reach the shell.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    """What the worker holds, as its Hello reports it to the scheduler."""

    identity: str
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    dtype: str
    device: str


@dataclass(frozen=True)
class WorkerSettings:
    """The transport's settings; the server fills them from flags and the environment."""

    scheduler: str  # "HOST:PORT" (or a full "tcp://..." endpoint) of the step ROUTER
    worker_id: str
    shared_secret: str = ""
    http_host: str = "127.0.0.1"
    http_port: int = 8002
    # Used until a Welcome's config says otherwise.
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 10.0
    # After a non-fatal Refusal, Hello again after this long, doubling up to the maximum.
    hello_backoff_s: float = 0.5
    hello_backoff_max_s: float = 10.0
    # How long closing a socket may wait to deliver what is queued (the last result).
    linger_ms: int = 1000
    # After SIGTERM: how long the worker keeps running the sequences it holds.
    drain_grace_s: float = 30.0


def endpoint(address: str) -> str:
    """``HOST:PORT`` -> ``tcp://HOST:PORT``; a full ZeroMQ endpoint is kept as is."""
    return address if "://" in address else f"tcp://{address}"
