"""The import boundaries that hold at run time (import-linter checks the static graph)."""

import subprocess
import sys

import pytest

NO_TORCH = """
import sys
import {modules}
heavy = sorted(m for m in ("torch", "transformers", "triton") if m in sys.modules)
assert not heavy, heavy
"""


@pytest.mark.parametrize(
    "modules",
    [
        "pagoda",
        "pagoda.v1, pagoda.v1.step_pb2, pagoda.v1.session_pb2, pagoda.v1.api_pb2",
        "pagoda.sampling_params, pagoda.entrypoints.cli",
        "pagoda.model_card.card, pagoda.model_card.gguf_metadata, pagoda.model_card.writer",
        "pagoda.kv_events, pagoda.flags",
        "scheduler_svc.scheduler, scheduler_svc.block_manager",
        "gateway, gateway.server, gateway.__main__",
    ],
)
def test_shared_modules_and_the_scheduler_core_never_load_torch(modules):
    code = NO_TORCH.format(modules=modules)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
