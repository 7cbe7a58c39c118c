"""Holds a ``pagoda worker`` process at its very start until a file exists.

A test puts this folder on ``PYTHONPATH`` and names the file in
``HOLD_WORKER_UNTIL``: Python imports ``sitecustomize`` at start-up, before any of
pagoda, so the worker (and only the worker: other subcommands pass) waits there,
before its probes, its model and its Hello, until the test creates the file. That is
a worker slow to come up, held by the operating system, not a stand-in.
"""

import os
import sys
import time

_release = os.environ.get("HOLD_WORKER_UNTIL")
if _release and sys.argv[1:2] == ["worker"]:
    while not os.path.exists(_release):
        time.sleep(0.05)
