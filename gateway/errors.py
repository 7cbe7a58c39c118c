"""Errors a client can see, with their REST status, OpenAI body and gRPC code.

Every failure the gateway reports goes through ``GatewayError``, so the two APIs map
the same cause to the same answer: bad input is 400 / INVALID_ARGUMENT, overload 429 /
RESOURCE_EXHAUSTED, no scheduler 503 / UNAVAILABLE, a passed deadline 504 /
DEADLINE_EXCEEDED. The body is OpenAI's
``{"error": {"message", "type", "param", "code"}}``, which OpenAI's client libraries
parse into their exception classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from pagoda.v1 import session_pb2

_GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# OpenAI's error "type" for each status.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


@dataclass
class GatewayError(Exception):
    """A failure to report to the client; ``retry_after_s`` becomes ``Retry-After``."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    retry_after_s: int | None = None

    def __str__(self) -> str:
        return self.message

    @property
    def type(self) -> str:
        return _TYPES.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return _GRPC_CODES.get(self.status, grpc.StatusCode.UNKNOWN)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s else {}


def invalid(message: str, param: str | None = None) -> GatewayError:
    """Bad input: 400 / INVALID_ARGUMENT."""
    return GatewayError(400, message, param=param)


def model_not_found(model: str, served: str) -> GatewayError:
    """An unknown model: 404 with OpenAI's ``model_not_found`` code."""
    return GatewayError(
        404,
        f"The model `{model}` does not exist; this server serves `{served}`.",
        param="model",
        code="model_not_found",
    )


def unavailable(message: str, retry_after_s: int | None = 1) -> GatewayError:
    """No scheduler, or draining: 503 / UNAVAILABLE; the client may retry."""
    return GatewayError(503, message, code="service_unavailable", retry_after_s=retry_after_s)


def session_lost() -> GatewayError:
    """A request in flight when the scheduler session broke; retrying is safe."""
    return unavailable("the connection to the scheduler was lost; retry the request")


def no_session() -> GatewayError:
    return unavailable("the scheduler is unreachable; the gateway is reconnecting, retry shortly")


def draining() -> GatewayError:
    return unavailable("the gateway is shutting down; retry on another gateway")


# What a 503 for a stalled engine advises: the scheduler declares a stall only after
# its --stall-timeout (30 s by default), so an immediate retry would only be refused again.
STALLED_RETRY_AFTER_S = 5


def engine_not_serving() -> GatewayError:
    """The scheduler's gRPC health says NOT_SERVING: its engine has work and makes no
    progress (or it is shutting down), so a new request would only wait behind it."""
    return unavailable(
        "the scheduler reports that it is not serving: its engine is stalled (work pending "
        "and no step completing) or it is shutting down; retry shortly",
        STALLED_RETRY_AFTER_S,
    )


def dropped_by_scheduler() -> GatewayError:
    """The scheduler ended a sequence by itself (it dropped its queue while shutting down)."""
    return unavailable("the scheduler dropped the request before it finished; retry the request")


def deadline_exceeded(timeout_s: float) -> GatewayError:
    """The request's deadline passed before it finished: 504 / DEADLINE_EXCEEDED. It was
    aborted at the scheduler, so nothing more is computed for it."""
    return GatewayError(
        504,
        f"the request did not finish within its deadline of {timeout_s:g} s",
        code="deadline_exceeded",
    )


def from_rejection(rejected: session_pb2.Rejected) -> GatewayError:
    """The status of a submit the scheduler refused."""
    reasons = session_pb2.Rejected
    retry = rejected.retry_after_s or None
    if rejected.reason == reasons.QUEUE_FULL:
        return GatewayError(
            429,
            rejected.message or "the server is overloaded: its waiting queue is full",
            code="queue_full",
            retry_after_s=retry or 1,
        )
    if rejected.reason == reasons.DRAINING:
        return unavailable(rejected.message or "the scheduler is draining", retry or 1)
    return invalid(rejected.message or "the scheduler refused the request")


def internal(message: str = "internal error") -> GatewayError:
    return GatewayError(500, message)
