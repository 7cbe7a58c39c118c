"""The GEMM floor of the offline workload: only the model's matrix products, back to back.

What the engine cannot beat on this machine: the products of every layer and the LM head
for the tokens of ``bench/offline.py``'s workload (N prompts of L tokens, M tokens out), on
preallocated inputs, with the worker's own packed oneDNN weights (``cpu_gemm``), and
nothing else (no attention, norms, sampling or framework). Prefill runs in chunks of
``--max-num-batched-tokens`` with logits only for the rows that are sampled, as the engine
does; each later token is a decode step of N rows. The engine's throughput over this
floor's is the fraction of the floor it reaches.

    .venv/bin/python bench/gemm_floor.py --model $ANCHOR_DIR/tiny-llama

Prints one JSON line: the decode step's and the prefill's floor, and the workload's floor
in output tokens per second.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from worker_svc.layers import cpu_gemm

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_model


def layer_shapes(config: dict) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's products, with q/k/v and gate/up merged as run."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    return [
        (hidden, (heads + 2 * kv_heads) * head_dim),
        (heads * head_dim, hidden),
        (hidden, 2 * inter),
        (inter, hidden),
    ]


class Products:
    """Packed weights of every layer and the LM head, and preallocated inputs by shape."""

    def __init__(self, config: dict, dtype: torch.dtype):
        self.dtype = dtype
        self.packed = cpu_gemm.available(dtype)
        shapes = layer_shapes(config) * config["num_hidden_layers"]
        self.layers = [(fan_in, self._weight(fan_in, out)) for fan_in, out in shapes]
        self.hidden = config["hidden_size"]
        self.head = self._weight(self.hidden, config["vocab_size"])
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}

    def _weight(self, fan_in: int, fan_out: int) -> torch.Tensor:
        weight = torch.randn(fan_out, fan_in).mul_(fan_in**-0.5).to(self.dtype)
        return cpu_gemm.pack(weight) if self.packed else weight

    def _mul(self, rows: int, fan_in: int, weight: torch.Tensor) -> torch.Tensor:
        x = self.inputs.get((rows, fan_in))
        if x is None:
            x = self.inputs[(rows, fan_in)] = torch.randn(rows, fan_in).to(self.dtype)
        if self.packed:
            return cpu_gemm.linear(x, weight, None)
        return torch.nn.functional.linear(x, weight)

    def step(self, rows: int, sampled: int) -> float:
        """Seconds for one step's products: ``rows`` tokens, ``sampled`` LM-head rows."""
        start = time.perf_counter()
        for fan_in, weight in self.layers:
            self._mul(rows, fan_in, weight)
        if sampled:
            self._mul(sampled, self.hidden, self.head)
        return time.perf_counter() - start


def median_step(products: Products, rows: int, sampled: int, repeats: int) -> float:
    products.step(rows, sampled)  # oneDNN makes its primitive for the shape
    return statistics.median(products.step(rows, sampled) for _ in range(repeats))


def floor(products: Products, args: argparse.Namespace) -> dict[str, float]:
    """The workload's floor: its prefill chunks, then one decode step per later token."""
    total = args.num_prompts * args.input_len
    chunk = min(args.max_num_batched_tokens, total)
    chunks, rest = divmod(total, chunk)
    # A chunk samples the prompts it finishes: about chunk / input_len of them.
    prefill = chunks * median_step(products, chunk, chunk // args.input_len, args.repeats)
    if rest:
        prefill += median_step(products, rest, max(1, rest // args.input_len), args.repeats)
    decode = median_step(products, args.num_prompts, args.num_prompts, args.repeats)
    seconds = prefill + (args.output_len - 1) * decode
    return {
        "prefill_s": round(prefill, 4),
        "decode_step_ms": round(decode * 1e3, 3),
        "decode_step_layers_ms": round(
            median_step(products, args.num_prompts, 0, args.repeats) * 1e3, 3
        ),
        "workload_s": round(seconds, 3),
        "floor_out_tok_s": round(args.num_prompts * args.output_len / seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    anchor = Path(os.environ.get("ANCHOR_DIR", Path.home() / ".cache" / "pagoda-anchor"))
    p.add_argument("--model", type=Path, default=anchor / "tiny-llama")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=9, help="medians of this many")
    args = p.parse_args(argv)
    config = json.loads((args.model / "config.json").read_text())
    torch.manual_seed(0)
    products = Products(config, getattr(torch, args.dtype))
    result = {
        "model": str(args.model),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "packed": products.packed,
        **floor(products, args),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
