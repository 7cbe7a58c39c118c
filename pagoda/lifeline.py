"""A child of ``pagoda serve`` ends when its parent ends, however the parent ended.

``pagoda serve`` holds the write end of a pipe and hands the read end to each child,
naming its number in ``PAGODA_LIFELINE_FD``. The child reads it on a thread of its own.
Nobody writes, so the read returns only at end of file: when the last write end
closes, that is when the parent is gone, even by SIGKILL. The child then kills its
process group with SIGKILL (``pagoda serve`` starts each child in a session of its
own), so whatever the child started goes with it (compiler workers, for one). A parent
that died before the child looked leaves a pipe already at its end, so there is no race
to close. A pipe is used rather than ``PR_SET_PDEATHSIG``: it works off Linux, needs no
code between fork and exec, and does not fire when the parent's starting thread exits.

Without the variable nothing is watched: a pod's service, or one run by hand, has no
such parent and stops only on its signals.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import threading
from collections.abc import Mapping

ENV = "PAGODA_LIFELINE_FD"
_watched: int | None = None  # the pipe this process watches, once it does


class Lifeline:
    """The parent's side: one pipe whose read end every child inherits."""

    def __init__(self) -> None:
        # Both ends are non-inheritable: only a child named in pass_fds gets the read end,
        # and no child ever holds a write end (which would keep the pipe open).
        self.read_fd, self.write_fd = os.pipe()

    def child_env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        """``env`` (default: ours) with the variable that tells a child to watch."""
        return {**(os.environ if env is None else env), ENV: str(self.read_fd)}

    @property
    def pass_fds(self) -> tuple[int]:
        return (self.read_fd,)

    def close(self) -> None:
        """Cut the line on purpose: every child still watching kills itself."""
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def watch_parent() -> bool:
    """In a child, before anything else: end with the parent if the parent asked for it.
    The variable is taken out of the environment, so the child's own children do not
    watch a pipe that is not theirs. True when a watch started."""
    value = os.environ.pop(ENV, None)
    if value is None:
        return False
    fd = _pipe_fd(value)
    if fd is None:  # a stale variable, not a pipe handed down: watching it would be wrong
        print(f"pagoda: ignoring {ENV}={value!r}: not an inherited pipe", file=sys.stderr)
        return False
    os.set_inheritable(fd, False)
    global _watched
    _watched = fd
    threading.Thread(target=_wait_then_end, args=(fd,), name="lifeline", daemon=True).start()
    return True


def across_exec(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for this same process after an ``exec``, still watching its parent.

    A worker re-executes itself to preload libraries (worker_svc/runtime.py); the new
    program must watch the same pipe, so the pipe stays open across the exec and the
    variable names it again.
    """
    if _watched is None:
        return dict(env)
    os.set_inheritable(_watched, True)
    return {**env, ENV: str(_watched)}


def _pipe_fd(value: str) -> int | None:
    try:
        fd = int(value)
        return fd if fd > 2 and stat.S_ISFIFO(os.fstat(fd).st_mode) else None
    except (ValueError, OSError):
        return None


def _wait_then_end(fd: int) -> None:
    with contextlib.suppress(OSError):
        while os.read(fd, 1):
            pass  # nobody writes; end of file is the only answer that matters
    end_group()


def end_group() -> None:
    """SIGKILL to this process's group when it leads one, else to this process alone.
    No graceful stop: nobody is left to wait for it, and a supervisor that killed the
    parent wants the ports and the memory back now."""
    if os.getpgrp() == os.getpid():
        os.killpg(0, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
