"""No process of an end-to-end test outlives the test session, even when a test fails."""

from __future__ import annotations

import pytest

from tests.e2e.stack import LIVE


@pytest.fixture(scope="session", autouse=True)
def kill_leftovers():
    yield
    for process in LIVE:
        if process.proc.poll() is None:
            process.kill()
