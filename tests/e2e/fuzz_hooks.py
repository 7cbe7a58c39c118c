"""Schemathesis hooks and checks of tests/e2e/test_fuzz.py, loaded through
``SCHEMATHESIS_HOOKS``.

A generation call that names no token budget runs to ``max_model_len``; on two cores a
thousand such calls would take minutes. So a call whose budget is absent or null gets a
small one before it is sent (schemathesis then checks the body again, so a case stays
positive or negative as it really is). A budget the fuzzer chose is kept.

``no_server_error`` stands in for schemathesis' ``not_a_server_error``: no 5xx, with one
exception, a 504 ``deadline_exceeded`` for a call whose own ``timeout`` was shorter than
the time it was answered in (the fuzzer sends deadlines down to 5e-324 s; the 504 is
the documented answer then).
"""

from __future__ import annotations

from typing import Any

import schemathesis

BUDGET = 8
BUDGETS = {
    "/v1/completions": ("max_tokens",),
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
}


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: Any) -> None:
    fields = BUDGETS.get(case.operation.path)
    body = case.body
    if fields is None or not isinstance(body, dict):
        return
    if all(body.get(name) is None for name in fields):
        body[fields[-1]] = BUDGET


@schemathesis.check
def no_server_error(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """Never a 5xx, except the 504 of a call whose own deadline had passed."""
    status = response.status_code
    if status < 500:
        return None
    if status == 504 and _deadline_passed(case.body, response):
        return None
    raise AssertionError(f"server error {status}: {response.text[:500]}")


def _deadline_passed(body: Any, response: schemathesis.Response) -> bool:
    timeout = body.get("timeout") if isinstance(body, dict) else None
    if not isinstance(timeout, int | float) or isinstance(timeout, bool):
        return False
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return False
    return code == "deadline_exceeded" and timeout <= response.elapsed
