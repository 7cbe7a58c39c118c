"""GPU figures: decode attention bandwidth, prefill attention TFLOP/s, offline end to end.

Run by ``bench/gpu`` after the kernel tests; prints one JSON line on stdout (progress
goes to stderr). Everything runs from the source tree against the machine's own
torch and triton. The shapes are Llama-3-8B's attention (32 query heads, 8 KV heads,
head size 128) in bfloat16 with 16-token blocks scattered over the cache:

- ``copy_gbs``: what ``Tensor.copy_`` moves per second (bytes read + written), the
  bandwidth a memory-bound kernel can hope for;
- ``decode``: per batch shape, the kernel's time, the K/V bytes it must read over
  that time, that as a fraction of ``copy_gbs``, and its largest difference from the
  torch reference;
- ``prefill``: causal attention FLOPs over the kernel's time, beside torch's fused
  (flash) attention on the same tokens laid out densely;
- ``offline``: ``bench/offline.py``'s workload on a random-weight Llama of about 1B
  parameters in bfloat16: pagoda eager, pagoda with CUDA graphs, transformers.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.offline import make_runs, measure, summarize, versions

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
DTYPE = torch.bfloat16


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def paged_cache(ctx_lens: list[int], seed: int = 0):
    """K/V caches with every sequence's blocks scattered (shuffled) over the pool."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    need = [math.ceil(c / BLOCK) for c in ctx_lens]
    num_blocks = sum(need)
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k = torch.randn(shape, generator=gen, device="cuda").to(DTYPE)
    v = torch.randn(shape, generator=gen, device="cuda").to(DTYPE)
    ids = torch.randperm(num_blocks, generator=gen, device="cuda")
    width = max(need)
    tables = torch.zeros(len(ctx_lens), width, dtype=torch.long, device="cuda")
    start = 0
    for s, n in enumerate(need):
        tables[s, :n] = ids[start : start + n]
        start += n
    return k, v, tables, torch.tensor(ctx_lens, device="cuda")


def decode_case(num_seqs: int, ctx: int, copy_gbs: float) -> dict[str, Any]:
    from pagoda_kernels import attention as reference
    from pagoda_kernels import triton_attention as tri

    k, v, tables, lens = paged_cache([ctx] * num_seqs)
    q = torch.randn(num_seqs, HEADS, HEAD_DIM, device="cuda").to(DTYPE)
    scale = HEAD_DIM**-0.5
    out = tri.paged_attention_decode(q, k, v, tables, lens, scale)
    err = out.float() - reference.paged_attention_decode(q, k, v, tables, lens, scale).float()
    ms = bench_ms(lambda: tri.paged_attention_decode(q, k, v, tables, lens, scale))
    kv_bytes = 2 * num_seqs * ctx * KV_HEADS * HEAD_DIM * k.element_size()
    gbs = kv_bytes / ms / 1e6
    split = num_seqs * KV_HEADS < tri.SPLIT_BELOW_PROGRAMS and ctx > 2 * tri.PARTITION
    return {
        "seqs": num_seqs, "ctx": ctx, "split_k": split, "ms": round(ms, 4),
        "gbs": round(gbs, 1), "of_copy": round(gbs / copy_gbs, 3),
        "max_abs_err": round(err.abs().max().item(), 5),
    }  # fmt: skip


def prefill_case(num_seqs: int, q_len: int, prefix: int) -> dict[str, Any]:
    from pagoda_kernels import triton_attention as tri

    ctx = prefix + q_len
    k, v, tables, lens = paged_cache([ctx] * num_seqs, seed=1)
    q = torch.randn(num_seqs * q_len, HEADS, HEAD_DIM, device="cuda").to(DTYPE)
    starts = torch.arange(0, num_seqs * q_len + 1, q_len, device="cuda")
    scale = HEAD_DIM**-0.5
    ms = bench_ms(lambda: tri.paged_attention_prefill(q, k, v, tables, starts, lens, scale))
    # Query i of a chunk sees prefix + i + 1 keys: two matmuls of 2 FLOPs a multiply-add.
    keys_seen = num_seqs * (q_len * prefix + q_len * (q_len + 1) // 2)
    flops = 4 * HEADS * HEAD_DIM * keys_seen
    result = {
        "seqs": num_seqs, "q_len": q_len, "prefix": prefix, "ms": round(ms, 4),
        "tflops": round(flops / ms / 1e9, 1),
    }  # fmt: skip
    if prefix == 0:  # torch's flash attention on the same tokens, dense and contiguous
        dq = q.view(num_seqs, q_len, HEADS, HEAD_DIM).transpose(1, 2)
        dk = torch.randn(num_seqs, KV_HEADS, q_len, HEAD_DIM, device="cuda").to(DTYPE)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        ms_ref = bench_ms(lambda: sdpa(dq, dk, dk, is_causal=True, enable_gqa=True))
        result["torch_sdpa_tflops"] = round(flops / ms_ref / 1e9, 1)
    return result


def make_model(root: Path) -> Path:
    """A Llama of about 1B parameters (Llama 3.2 1B's shape, 32k vocabulary), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
        max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(DTYPE)
    path = root / "llama-1b-random"
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def engine(spec: dict) -> dict[str, Any]:
    """One engine, in a process of its own (each takes most of the GPU's memory)."""
    if spec["engine"] == "transformers":
        from bench.offline import transformers_engine

        return transformers_engine({**spec, "dtype": "bfloat16", "device": "cuda"})
    from pagoda import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model"], dtype="bfloat16", max_model_len=spec["max_model_len"],
        max_num_seqs=spec["max_num_seqs"], max_num_batched_tokens=8192, seed=0,
        cuda_graphs=spec["engine"] == "pagoda_graphs", show_progress=False,
    )  # fmt: skip
    load_s = time.perf_counter() - t0
    first: list = []

    def generate(prompts, max_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        first.append(tokens)
        return tokens

    timings = measure(generate, spec["runs"], spec["output_len"])
    return {
        **timings, "load_s": load_s, "tokens": first[0], "backend": llm.runner.ops.name,
        "versions": versions("torch", "triton", "transformers"),
    }  # fmt: skip


def offline(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    runs = make_runs(model, args.num_prompts, args.input_len, args.repeats + 1, seed=0)
    spec = {
        "model": str(model), "runs": runs, "output_len": args.output_len,
        "max_model_len": args.input_len + args.output_len, "max_num_seqs": args.num_prompts,
    }  # fmt: skip
    results: dict[str, Any] = {}
    tokens: dict[str, list] = {}
    for name in ("pagoda", "pagoda_graphs", "transformers"):
        log(f"offline: {name}")
        raw = _subprocess({**spec, "engine": name})
        tokens[name] = raw.pop("tokens", None)
        results[name] = summarize(raw, args.num_prompts, args.input_len, args.output_len)
        results[name].pop("wall_s_runs", None)
    if tokens.get("pagoda") and tokens.get("pagoda_graphs"):
        same = sum(a == b for a, b in zip(tokens["pagoda"], tokens["pagoda_graphs"], strict=True))
        results["graphs_same_tokens"] = f"{same}/{len(tokens['pagoda'])}"
    base = results["transformers"].get("output_tok_s")
    for name in ("pagoda", "pagoda_graphs"):
        if base and "output_tok_s" in results[name]:
            results[name]["vs_transformers"] = round(results[name]["output_tok_s"] / base, 2)
    return results


def _subprocess(spec: dict) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(spec))
        cmd = [sys.executable, __file__, "--engine", str(spec_file), str(out_file)]
        proc = subprocess.run(cmd, stdout=sys.stderr, check=False)
        if proc.returncode or not out_file.exists():
            return {"error": f"exit code {proc.returncode}"}
        return json.loads(out_file.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    p.add_argument("--tests", default="", help="the kernel tests' summary line, to report")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-offline", action="store_true")
    args = p.parse_args()
    if args.engine:
        spec = json.loads(Path(args.engine[0]).read_text())
        Path(args.engine[1]).write_text(json.dumps(engine(spec)))
        return 0
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "versions": versions("torch", "triton", "transformers", "protobuf"),
        "tests": args.tests,
    }
    copy_gbs = copy_bandwidth()
    report["copy_gbs"] = round(copy_gbs, 1)
    log(f"copy bandwidth {copy_gbs:.0f} GB/s")
    report["decode"] = []
    for seqs, ctx in ((64, 2048), (128, 2048), (64, 4096), (256, 1024), (4, 32768), (1, 8192)):
        report["decode"].append(decode_case(seqs, ctx, copy_gbs))
        log("decode", report["decode"][-1])
    report["prefill"] = []
    for seqs, q_len, prefix in ((4, 2048, 0), (1, 8192, 0), (8, 512, 3584)):
        report["prefill"].append(prefill_case(seqs, q_len, prefix))
        log("prefill", report["prefill"][-1])
    torch.cuda.empty_cache()
    if not args.skip_offline:
        with tempfile.TemporaryDirectory() as tmp:
            report["offline"] = offline(make_model(Path(tmp)), args)
            report["offline"]["workload"] = (
                f"{args.num_prompts} x {args.input_len} -> {args.output_len}, bf16, "
                "random-weight Llama 1B shape"
            )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
