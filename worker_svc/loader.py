"""Loading a model from a local checkpoint: a Hugging Face folder or a GGUF file.

Weights stream one tensor at a time from ``*.safetensors`` (single or sharded), else
from ``pytorch_model*.bin`` (``torch.load(weights_only=True, mmap=True)``), else from
a GGUF file, into parameters that were allocated empty in the target dtype, so two
full copies of the model never exist at once.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pagoda_kernels.dispatch import Ops
from worker_svc.models import build_model, model_class

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def read_config(path: Path) -> dict:
    """The config.json dict of a checkpoint (for GGUF, built from its metadata)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    if is_gguf(path):
        from pagoda.model_card.gguf_metadata import read_gguf_config

        return read_gguf_config(path)
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a model folder: it has no config.json")
    return json.loads(file.read_text())


def resolve_dtype(spec: str | torch.dtype, config: dict, device: torch.device) -> torch.dtype:
    """``auto`` takes the checkpoint's dtype, with float16 as bfloat16 on the CPU (faster there).

    A GGUF file counts as bfloat16: its weights are quantized more coarsely than that.
    """
    if isinstance(spec, torch.dtype):
        return spec
    if spec != "auto":
        try:
            return DTYPES[spec]
        except KeyError:
            raise ValueError(
                f"unknown dtype {spec!r}; use auto, float32, bfloat16 or float16"
            ) from None
    stored = DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "float32"))
    if stored is None:
        stored = torch.float32
    if stored == torch.float16 and device.type == "cpu":
        return torch.bfloat16
    return stored


def weight_files(path: Path) -> tuple[str, list[Path]]:
    """('safetensors' | 'bin', files) of a Hugging Face folder."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return "safetensors", [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return "safetensors", files
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return "bin", [path / n for n in names]
    files = sorted(path.glob("pytorch_model*.bin"))
    if files:
        return "bin", files
    raise FileNotFoundError(
        f"no weights in {str(path)!r}: expected *.safetensors or pytorch_model*.bin"
    )


def iter_weights(path: Path) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
    """(number of tensors, the tensors one at a time) of a Hugging Face folder."""
    kind, files = weight_files(path)
    if kind == "safetensors":
        from safetensors import safe_open

        count = 0
        for f in files:
            with safe_open(f, framework="pt") as handle:
                count += len(list(handle.keys()))

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for f in files:
                with safe_open(f, framework="pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 (a safe_open handle is no dict)
                        yield name, handle.get_tensor(name)

        return count, tensors()

    def from_bin() -> Iterator[tuple[str, torch.Tensor]]:
        for f in files:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
            del state

    return -1, from_bin()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(
    path: str | Path,
    dtype: str | torch.dtype,
    device: torch.device,
    ops: Ops,
    tp: tuple[int, int] = (0, 1),
    show_progress: bool = True,
) -> tuple[nn.Module, dict, torch.dtype]:
    """Build the model for a checkpoint and fill its weights; returns (model, config, dtype)."""
    path = Path(path)
    if is_gguf(path):
        from pagoda.model_card.gguf_metadata import open_gguf, read_gguf_config
        from worker_svc.gguf import load_gguf

        reader = open_gguf(path)  # parsing the metadata takes seconds: once
        config = {"dtype": "bfloat16", **read_gguf_config(reader)}
        model_class(config)
        dtype = resolve_dtype(dtype, config, device)
        config, weights = load_gguf(reader, dtype)
        count = -1
    else:
        config = read_config(path)
        model_class(config)  # an unsupported architecture fails before any weight is read
        dtype = resolve_dtype(dtype, config, device)
        count, weights = iter_weights(path)
    with _default_dtype(dtype), torch.device(device):
        model = build_model(config, ops, tp)
    bar = tqdm(
        weights,
        total=count if count >= 0 else None,
        desc="Loading weights",
        unit="tensor",
        disable=not show_progress,
        leave=False,
    )
    model.load_weights(bar)
    model.eval()
    return model, config, dtype
