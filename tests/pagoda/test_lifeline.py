"""``pagoda.lifeline`` with real processes: a child and what it started end with the parent.

Each test runs a parent process that holds a ``Lifeline`` and starts a child the way
``pagoda serve`` does (its own session, the read end in ``pass_fds``); the child starts
a grandchild in its group and watches. The parent is then killed with SIGKILL, or exits
before the child even looked; the child and the grandchild must go. Without the
variable, or with one that names no pipe, nothing is watched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GONE_WITHIN_S = 20.0  # a bound for a loaded machine, not a measurement

# The child: start a grandchild in its group and print its pid; optionally wait (the
# parent may be gone by then); watch, print whether it does, and sleep past the test.
CHILD = textwrap.dedent(
    """
    import subprocess, sys, time
    from pagoda import lifeline
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(grandchild.pid, flush=True)
    time.sleep(float(sys.argv[1]))
    print(lifeline.watch_parent(), flush=True)
    time.sleep(600)
    """
)

# The parent: a Lifeline and the child started as pagoda serve starts one; it prints the
# child's pid, then either sleeps (to be killed) or exits at once.
PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    from pagoda.lifeline import Lifeline
    line = Lifeline()
    child = subprocess.Popen(
        [sys.executable, "-c", sys.argv[1], sys.argv[2]], env=line.child_env(None),
        pass_fds=line.pass_fds, start_new_session=True, stdout=sys.stdout,
    )
    print(child.pid, flush=True)
    if sys.argv[3] == "stay":
        time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_gone(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + GONE_WITHIN_S
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if _alive(pid)]


def _kill_groups(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("delay", "parent_stays"),
    [(0.0, True), (2.0, False)],
    ids=["parent-killed", "parent-gone-before-the-child-looked"],
)
def test_the_child_and_its_own_children_end_with_the_parent(delay, parent_stays):
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD, str(delay), "stay" if parent_stays else "go"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    grandchild = int(parent.stdout.readline())
    if parent_stays:
        assert parent.stdout.readline().strip() == "True"  # the child watches
        parent.kill()
    else:
        assert parent.wait(timeout=60) == 0  # gone before the child watches
    parent.wait()
    left = _wait_gone([child, grandchild])
    _kill_groups(left)
    assert not left, "outlived their parent"


@pytest.mark.parametrize("value", [None, "0", "999", "not-a-number", "regular-file"])
def test_without_a_handed_down_pipe_nothing_is_watched(value, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PAGODA_LIFELINE_FD"}
    script = "from pagoda import lifeline; print(lifeline.watch_parent())"
    pass_fds: tuple[int, ...] = ()
    if value == "regular-file":
        fd = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT)
        os.set_inheritable(fd, True)
        pass_fds, value = (fd,), str(fd)
    if value is not None:
        env["PAGODA_LIFELINE_FD"] = value
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, pass_fds=pass_fds,
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "False"
    assert ("ignoring PAGODA_LIFELINE_FD" in out.stderr) == (value is not None)
