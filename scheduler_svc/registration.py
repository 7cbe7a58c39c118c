"""Whether a worker's Hello may join: the checks of registration, as one pure function.

A worker of another model, with a wrong secret, another block size or protocol, or too
small to hold one sequence of ``max_model_len`` would fail the same way on every retry,
so each of those refusals is fatal (the worker exits 1 instead of looping).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from pagoda.v1 import PROTOCOL_VERSION, step_pb2


@dataclass(frozen=True)
class Expected:
    """What the scheduler requires of every worker (from its model card and flags)."""

    identity: str
    block_size: int
    max_model_len: int
    shared_secret: str = ""


def check_hello(hello: step_pb2.Hello, expected: Expected) -> step_pb2.Refusal | None:
    """The Refusal for a Hello that may not join, or None when it may."""
    reason = _problem(hello, expected)
    return None if reason is None else step_pb2.Refusal(reason=reason, fatal=True)


def _problem(hello: step_pb2.Hello, expected: Expected) -> str | None:
    if hello.protocol_version != PROTOCOL_VERSION:
        return (
            f"the worker speaks step protocol {hello.protocol_version}, "
            f"this scheduler {PROTOCOL_VERSION}"
        )
    if expected.shared_secret and not hmac.compare_digest(
        hello.shared_secret.encode(), expected.shared_secret.encode()
    ):
        return "wrong or missing shared secret"
    if not hello.worker_id:
        return "the Hello carries no worker_id"
    if hello.model_identity != expected.identity:
        return (
            f"the worker serves model {hello.model_identity[:12] or '(none)'}, this scheduler "
            f"{expected.identity[:12]}: start the worker with the model of the scheduler's card"
        )
    if hello.block_size != expected.block_size:
        return (
            f"the worker uses blocks of {hello.block_size} tokens, "
            f"the scheduler {expected.block_size}"
        )
    if hello.tp_size > 1:
        return f"tensor parallelism (tp_size {hello.tp_size}) is not supported by this scheduler"
    if hello.max_model_len < expected.max_model_len:
        return (
            f"the worker runs sequences of at most {hello.max_model_len} tokens; the scheduler's "
            f"max_model_len is {expected.max_model_len}"
        )
    if hello.num_kv_blocks * expected.block_size < expected.max_model_len:
        return (
            f"the worker's {hello.num_kv_blocks} KV blocks of {expected.block_size} tokens cannot "
            f"hold one sequence of max_model_len {expected.max_model_len}"
        )
    return None
