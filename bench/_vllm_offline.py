"""vLLM's side of bench/offline.py: runs in vLLM's own virtual environment.

It imports only vLLM, torch and the standard library. bench/offline.py writes the spec
(model, prompts, limits) and starts it with that environment's Python and, when tuned,
the thread binding and preloads in the environment:

    $ANCHOR_DIR/venv/bin/python bench/_vllm_offline.py SPEC.json [RESULT.json]

It prints the raw timings as one JSON line (and writes them to RESULT.json if given),
timed by bench/offline.py's own ``measure``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from vllm import LLM, SamplingParams

# bench/offline.py imports only the standard library, so its timing loop serves here too.
sys.path.insert(0, str(Path(__file__).parent))
import offline

Prompts = list[list[int]]


def generator(llm: LLM):
    """vLLM's generate in the shape bench/offline.py times: token ids in, token ids out."""

    def generate(prompts: Prompts, max_tokens: int) -> Prompts:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        requests = [{"prompt_token_ids": p} for p in prompts]
        outputs = llm.generate(requests, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    return generate


def bound_threads(bind: str) -> int | None:
    """Compute threads vLLM binds for VLLM_CPU_OMP_THREADS_BIND='0-1' (one process)."""
    if bind in ("", "auto", "nobind") or "|" in bind:
        return None
    count = 0
    for part in bind.split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


def run(spec: dict) -> dict[str, Any]:
    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        max_model_len=spec["max_model_len"],
        max_num_seqs=spec["max_num_seqs"],
        max_num_batched_tokens=spec["max_num_batched_tokens"],
        kv_cache_memory_bytes=spec["kv_cache_bytes"],
        seed=spec["seed"],
    )
    load_s = time.perf_counter() - t0
    timings = offline.measure(generator(llm), spec["runs"], spec["output_len"])
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    names = ("VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD", "VLLM_USE_AOT_COMPILE")
    return {
        **timings,
        "load_s": load_s,
        "torch_threads": bound_threads(bind),
        "env": {k: os.environ[k] for k in names if k in os.environ},
        "versions": {
            "python": platform.python_version(),
            **{p: importlib.metadata.version(p) for p in ("vllm-cpu", "torch", "transformers")},
        },
    }


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        sys.exit("usage: _vllm_offline.py SPEC.json [RESULT.json]")
    spec = json.loads(Path(argv[0]).read_text())
    try:
        result = run(spec)
    except Exception as e:
        if len(argv) == 2:
            Path(argv[1]).write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        raise
    line = json.dumps(result)
    if len(argv) == 2:
        Path(argv[1]).write_text(line)
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
