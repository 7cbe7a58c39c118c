"""Offline throughput: one batch of random prompts through pagoda, transformers and vLLM.

The workload is vLLM's offline throughput benchmark: N prompts of L random token ids,
each generating exactly M tokens (``ignore_eos``), greedy. For every engine it prints one
JSON line on stdout (logs go to stderr):

- ``output_tok_s``: N*M output tokens over the wall time of ``generate`` on the batch;
  ``total_tok_s``: prompt and output tokens, N*(L+M), over the same wall time;
- ``ttft_ms``: one prompt alone, generating one token; ``tpot_ms``: one prompt alone
  generating M tokens, minus that first-token time, over the M-1 further tokens;
- each a median over ``--repeats`` runs, after one warm-up run that is not counted.

Every run (the warm-up too) uses fresh prompts, so that no engine's prefix cache
hits; the prompts are drawn once from ``--seed`` and are the same for every engine:
ids in [0, vocabulary size), special tokens left out. Each engine runs in a process of
its own: pagoda and transformers with this Python, vLLM with the Python of its own
virtual environment (``--vllm-python``) running ``bench/_vllm_offline.py``, by default
"tuned": compute threads bound to every core, tcmalloc and Intel OpenMP preloaded.

The models and the vLLM environment come from the anchor (see bench/README.md):

    export ANCHOR_DIR=$HOME/.cache/pagoda-anchor
    .venv/bin/python bench/offline.py                         # tiny Llama, 64 x 128 -> 128
    .venv/bin/python bench/offline.py --model default --compile both
    .venv/bin/python bench/offline.py --engines transformers,vllm \\
        --num-prompts 8 --input-len 32 --output-len 16 --repeats 1
    .venv/bin/python bench/offline.py --engines vllm --vllm-untuned > vllm-default.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENGINES = ("pagoda", "transformers", "vllm")
VLLM_SCRIPT = Path(__file__).with_name("_vllm_offline.py")
TCMALLOC = "debs/root/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"

Prompts = list[list[int]]
Generate = Callable[[Prompts, int], Prompts]


def anchor_dir() -> Path:
    return Path(os.environ.get("ANCHOR_DIR", Path.home() / ".cache" / "pagoda-anchor"))


def resolve_model(name: str | None) -> Path:
    """The HF folder to load: the anchor's tiny Llama by default, its SmolLM2 for 'default'."""
    if name is None:
        return anchor_dir() / "tiny-llama"
    if name == "default":
        return anchor_dir() / "smollm2-135m"
    return Path(name).expanduser()


def cpu_description() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    fields = {
        k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in out.splitlines() if ":" in ln)
    }
    return (
        f"{fields.get('Model name', 'unknown')}, CPU family {fields.get('CPU family', '?')} "
        f"(model {fields.get('Model', '?')}), {fields.get('CPU(s)', '?')} CPUs"
    )


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def cpu_ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts: list[str] = []
    start = prev = cpus[0]
    for c in cpus[1:] + [-1]:
        if c != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = c
        prev = c
    return ",".join(parts)


def vocabulary(model_dir: Path) -> tuple[int, set[int]]:
    """Token ids a prompt may use: [0, size), minus the special tokens."""
    config = json.loads((model_dir / "config.json").read_text())
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not size:
        raise ValueError(f"{model_dir}/config.json has no vocab_size")
    special: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = config.get(key)
        special.update(value if isinstance(value, list) else [] if value is None else [value])
    tokenizer_file = model_dir / "tokenizer.json"
    if tokenizer_file.exists():
        tokenizer = json.loads(tokenizer_file.read_text())
        added = tokenizer.get("added_tokens", [])
        special.update(t["id"] for t in added if t.get("special"))
        vocab = tokenizer.get("model", {}).get("vocab")
        ids = list(vocab.values()) if isinstance(vocab, dict) else []
        ids += [t["id"] for t in added]
        if ids:  # the tokenizer may know fewer ids than the embedding has rows
            size = min(size, max(ids) + 1)
    return size, special


def make_runs(model_dir: Path, num_prompts: int, input_len: int, runs: int, seed: int) -> list:
    """For each run: a batch of prompts, a prompt for TTFT and one for TPOT, all fresh."""
    size, special = vocabulary(model_dir)
    rng = random.Random(seed)

    def prompt() -> list[int]:
        ids: list[int] = []
        while len(ids) < input_len:
            t = rng.randrange(size)
            if t not in special:
                ids.append(t)
        return ids

    return [
        {"batch": [prompt() for _ in range(num_prompts)], "first": prompt(), "single": prompt()}
        for _ in range(runs)
    ]


def timed(generate: Generate, prompts: Prompts, max_tokens: int) -> float:
    t0 = time.perf_counter()
    outputs = generate(prompts, max_tokens)
    seconds = time.perf_counter() - t0
    lengths = sorted({len(o) for o in outputs})
    if len(outputs) != len(prompts) or lengths != [max_tokens]:
        raise RuntimeError(
            f"{len(prompts)} prompts, {max_tokens} tokens each: got {len(outputs)} outputs "
            f"of lengths {lengths}"
        )
    return seconds


def measure(generate: Generate, runs: list, output_len: int) -> dict[str, Any]:
    """Raw timings: the first run warms up, the others are measured (vLLM's script too)."""
    batch_s: list[float] = []
    first_s: list[float] = []
    single_s: list[float] = []
    for i, run in enumerate(runs):
        b = timed(generate, run["batch"], output_len)
        f = timed(generate, [run["first"]], 1)
        s = timed(generate, [run["single"]], output_len)
        if i > 0:
            batch_s.append(b)
            first_s.append(f)
            single_s.append(s)
    return {"batch_s": batch_s, "first_s": first_s, "single_s": single_s}


def versions(*packages: str) -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def pagoda_engine(spec: dict) -> dict[str, Any]:
    import torch

    try:
        from pagoda import LLM, SamplingParams
    except ImportError as e:
        return {"error": f"pagoda's offline API is not available: {e}"}
    torch.set_num_threads(len(usable_cpus()))
    from worker_svc.runtime import bind_threads

    binding = bind_threads(spec.get("threads_bind", "nobind"), torch.get_num_threads())
    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        max_model_len=spec["max_model_len"],
        max_num_seqs=spec["max_num_seqs"],
        max_num_batched_tokens=spec["max_num_batched_tokens"],
        kv_cache_memory=spec["kv_cache_bytes"],
        seed=spec["seed"],
        compile=spec["compile"],
        attention_backend=spec.get("attention_backend", "auto"),
    )
    load_s = time.perf_counter() - t0

    def generate(prompts: Prompts, max_tokens: int) -> Prompts:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        requests = [{"prompt_token_ids": p} for p in prompts]
        outputs = llm.generate(requests, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    timings = measure(generate, spec["runs"], spec["output_len"])
    return {
        **timings,
        "load_s": load_s,
        "backend": llm.runner.ops.describe(),
        "runtime": spec.get("runtime"),
        "threads_bind": binding,
        "torch_threads": torch.get_num_threads(),
        "versions": versions("pagoda", "torch", "transformers"),
    }


def transformers_engine(spec: dict) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(len(usable_cpus()))
    device = spec.get("device", "cpu")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"]))
    model.to(device).eval()
    load_s = time.perf_counter() - t0
    pad = model.config.pad_token_id
    if pad is None:
        eos = model.config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) or 0

    def generate(prompts: Prompts, max_tokens: int) -> Prompts:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                pad_token_id=pad,
            )
        return out[:, width:].tolist()

    timings = measure(generate, spec["runs"], spec["output_len"])
    return {
        **timings,
        "load_s": load_s,
        "torch_threads": torch.get_num_threads(),
        "versions": versions("torch", "transformers"),
    }


def run_worker(engine: str, spec_file: Path, result_file: Path) -> int:
    """In the engine's own process: run one engine on the spec, write its raw result."""
    spec = json.loads(spec_file.read_text())
    if engine == "pagoda_split":
        from _split import split_engine  # beside this file

        run = lambda spec: split_engine(spec, measure)  # noqa: E731
    else:
        run = pagoda_engine if engine == "pagoda" else transformers_engine
    if engine == "pagoda":
        # The worker's own start: on a CPU this process may re-execute itself once with
        # tcmalloc and Intel OpenMP preloaded; the spec file is still there for it.
        from worker_svc.runtime import settle

        spec["runtime"] = settle(spec.get("cpu_runtime", "plain"), spec.get("device", "cpu"))
    try:
        result = run(spec)
    except Exception as e:
        result_file.write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        raise
    result_file.write_text(json.dumps(result))
    return 0


def vllm_env(vllm_python: Path, tuned: bool) -> dict[str, str]:
    """The environment for vLLM's process; tuned: all cores bound, tcmalloc + iomp5 preloaded."""
    env = dict(os.environ, VLLM_USE_AOT_COMPILE="0")
    if not tuned:
        return env
    env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_ranges(usable_cpus())
    venv = vllm_python.parent.parent
    libs = [anchor_dir() / TCMALLOC, venv / "lib" / "libiomp5.so"]
    for lib in libs:
        if not lib.exists():
            print(f"warning: {lib} not found, vLLM runs without it", file=sys.stderr)
    preload = [str(lib) for lib in libs if lib.exists()]
    if env.get("LD_PRELOAD"):
        preload.append(env["LD_PRELOAD"])
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


def run_engine(cmd: list[str], spec: dict, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one engine's process on the spec; its stdout and stderr go to our stderr."""
    with tempfile.TemporaryDirectory(prefix="pagoda-offline-") as tmp:
        spec_file, result_file = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_file.write_text(json.dumps(spec))
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd + [str(spec_file), str(result_file)], stdout=sys.stderr, env=env, check=False
        )
        elapsed = time.perf_counter() - t0
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
    if proc.returncode != 0 and "error" not in result:
        result = {"error": f"the engine's process exited with code {proc.returncode}"}
    result["process_s"] = round(elapsed, 1)
    return result


def summarize(raw: dict[str, Any], num_prompts: int, input_len: int, output_len: int) -> dict:
    """Medians of the raw timings, as throughput and latency figures."""
    if "error" in raw:
        return {"error": raw["error"], "process_s": raw.get("process_s")}
    wall = statistics.median(raw["batch_s"])
    ttft = statistics.median(raw["first_s"])
    tpots = [
        (s - f) / (output_len - 1) for s, f in zip(raw["single_s"], raw["first_s"], strict=True)
    ]
    return {
        "output_tok_s": round(num_prompts * output_len / wall, 1),
        "total_tok_s": round(num_prompts * (input_len + output_len) / wall, 1),
        "ttft_ms": round(ttft * 1e3, 2),
        "tpot_ms": round(statistics.median(tpots) * 1e3, 2),
        "wall_s": round(wall, 3),
        "wall_s_runs": [round(s, 3) for s in raw["batch_s"]],
        "torch_threads": raw.get("torch_threads"),
        "load_s": round(raw["load_s"], 1) if "load_s" in raw else None,
        **({"backend": raw["backend"]} if "backend" in raw else {}),
        **({"runtime": raw["runtime"]} if raw.get("runtime") else {}),
        **({"threads_bind": raw["threads_bind"]} if raw.get("threads_bind") else {}),
        "process_s": raw.get("process_s"),
        "versions": raw.get("versions"),
    } | ({"env": raw["env"]} if "env" in raw else {})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: %(default)s")
    p.add_argument(
        "--model",
        default=None,
        help="HF folder; 'default' = SmolLM2-135M from the anchor "
        "(default: $ANCHOR_DIR/tiny-llama)",
    )
    p.add_argument("--num-prompts", "-n", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="measured runs after the warm-up")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0, help="for the prompts and the engines")
    p.add_argument("--compile", default="off", choices=["off", "on", "both"], help="pagoda")
    p.add_argument(
        "--attention-backend",
        default="auto",
        help="pagoda's kernels, comma-separated to run each (e.g. torch,cpu): %(default)s",
    )
    p.add_argument(
        "--cpu-runtime",
        default="plain",
        help="pagoda's worker runtime, comma-separated to run each (plain,tuned): %(default)s",
    )
    p.add_argument(
        "--cpu-threads-bind",
        default="nobind",
        help="pagoda's thread binding, ';'-separated to run each (auto;nobind;0-1): %(default)s",
    )
    p.add_argument("--vllm-python", type=Path, default=None, help="default: $ANCHOR_DIR/venv")
    p.add_argument(
        "--vllm-untuned", action="store_true", help="vLLM's own thread and allocator defaults"
    )
    p.add_argument("--max-num-seqs", type=int, default=256, help="pagoda and vLLM")
    p.add_argument("--max-num-batched-tokens", type=int, default=4096, help="pagoda and vLLM")
    p.add_argument("--kv-cache-gib", type=int, default=4, help="KV cache size, pagoda and vLLM")
    p.add_argument(
        "--stack",
        default="inproc",
        choices=["inproc", "split"],
        help="split: pagoda also through the running services (pagoda serve, public gRPC)",
    )
    p.add_argument(
        "--no-detokenize",
        action="store_true",
        help="split: the client asks for token ids only (detokenize=false), so the "
        "gateway turns no token into text",
    )
    p.add_argument(
        "--worker", choices=["pagoda", "pagoda_split", "transformers"], help=argparse.SUPPRESS
    )
    p.add_argument("files", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.output_len < 2 or args.input_len < 1 or args.num_prompts < 1 or args.repeats < 1:
        p.error("need --output-len >= 2 and --input-len, --num-prompts, --repeats >= 1")
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(args.engines) - set(ENGINES))
    if unknown:
        p.error(f"unknown engines {unknown}; choose from {list(ENGINES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args.worker, *args.files)
    model_dir = resolve_model(args.model)
    if not (model_dir / "config.json").exists():
        sys.exit(f"no HF model at {model_dir}: set up the anchor (bench/README.md) or pass --model")
    n, m, length = args.num_prompts, args.output_len, args.input_len
    spec = {
        "model": str(model_dir),
        "dtype": args.dtype,
        "output_len": m,
        "seed": args.seed,
        "max_model_len": length + m,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_bytes": args.kv_cache_gib * 2**30,
        "detokenize": not args.no_detokenize,
        "runs": make_runs(model_dir, n, length, args.repeats + 1, args.seed),
    }
    common = {
        "model": model_dir.name,
        "dtype": args.dtype,
        "num_prompts": n,
        "input_len": length,
        "output_len": m,
        "repeats": args.repeats,
        "cpu": cpu_description(),
        "date": datetime.date.today().isoformat(),
    }
    me = [sys.executable, str(Path(__file__).resolve())]
    for engine in args.engines:
        if engine == "pagoda":
            modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
            for backend, runtime, bind, compiled in itertools.product(
                args.attention_backend.split(","),
                args.cpu_runtime.split(","),
                args.cpu_threads_bind.split(";"),
                modes,
            ):
                run = dict(spec, compile=compiled, attention_backend=backend)
                run |= {"cpu_runtime": runtime, "threads_bind": bind}
                raw = run_engine(me + ["--worker", "pagoda"], run)
                line = {"engine": "pagoda", "compile": compiled, **common}
                print(json.dumps(line | summarize(raw, n, length, m)), flush=True)
            if args.stack == "split":
                raw = run_engine(me + ["--worker", "pagoda_split"], spec)
                line = {"engine": "pagoda", "stack": "split", **common}
                line["detokenize"] = spec["detokenize"]
                keys = ("outside_worker_cpu_ms_per_step", "per_step")
                extra = {key: raw.get(key) for key in keys}
                print(json.dumps(line | summarize(raw, n, length, m) | extra), flush=True)
        elif engine == "transformers":
            raw = run_engine(me + ["--worker", "transformers"], spec)
            line = {"engine": "transformers", **common}
            print(json.dumps(line | summarize(raw, n, length, m)), flush=True)
        else:
            python = args.vllm_python or anchor_dir() / "venv" / "bin" / "python"
            tuned = not args.vllm_untuned
            line = {"engine": "vllm", "tuned": tuned, **common}
            if not python.exists():
                error = f"no vLLM python at {python}: set up the anchor or pass --vllm-python"
                print(json.dumps(line | {"error": error}), flush=True)
                continue
            raw = run_engine([str(python), str(VLLM_SCRIPT)], spec, vllm_env(python, tuned))
            print(json.dumps(line | summarize(raw, n, length, m)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
