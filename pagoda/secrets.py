"""Secrets from a flag, a file or the environment, never from a default.

A deployment mounts secrets as files (a Kubernetes Secret volume, a Docker secret):
an environment variable shows up in ``/proc/<pid>/environ``, in crash reports and in
``kubectl describe``-style tooling, a file readable only by the service does not. So
each secret has a value flag, a ``*-file`` flag, and the environment variables
``NAME`` and ``NAME_FILE`` (the ``_FILE`` convention of official container images).
The value is read when the service starts, not as a flag default, so that no help
text can print it.
"""

from __future__ import annotations

import os
from pathlib import Path


def read_secret(value: str | None, path: str | None, env: str) -> str:
    """The secret: ``value`` (its flag), else the file ``path`` (its ``*-file`` flag),
    else ``$ENV``, else the file named by ``$ENV_FILE``, else ``""`` (none).

    A named file that cannot be read or holds nothing is an error, not "no secret":
    a deployment that meant to set one must not start open.
    """
    if value:
        return value
    path = path or None
    if path is None and not os.environ.get(env):
        path = os.environ.get(f"{env}_FILE") or None
    if path is None:
        return os.environ.get(env, "")
    try:
        secret = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the secret file {path}: {exc}") from exc
    if not secret:
        raise ValueError(f"the secret file {path} is empty")
    return secret
