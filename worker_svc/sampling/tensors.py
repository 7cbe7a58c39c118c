"""Small tensor helpers every part of the sampler uses: buffers kept from step to step,
Python lists to tensors, one entry per row."""

from __future__ import annotations

from array import array

import torch


class Workspace:
    """Buffers kept from step to step, by name.

    A fresh tensor of a step's size (10 MB at 64 x 40k) costs the page faults of new
    memory whenever the allocator has handed the last one back to the system: on a
    2-core CPU, a bf16 temperature step took a median 9 ms with fresh buffers and 2.4 ms
    with these.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(
        self, name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        need = rows * cols
        buffer = self._buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffers[name] = torch.empty(need, dtype=dtype, device=device)
        elif buffer.numel() < need:
            size = max(need, 2 * buffer.numel())
            buffer = self._buffers[name] = torch.empty(size, dtype=dtype, device=device)
        return buffer[:need].view(rows, cols)

    def like(self, name: str, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.get(name, x.shape[0], x.shape[1], dtype or x.dtype, x.device)

    def float32(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` as float32: x itself when it is, else a copy here."""
        if x.dtype == torch.float32:
            return x
        return self.like(name, x, torch.float32).copy_(x)

    def rows(self, name: str, x: torch.Tensor, index: list[int]) -> torch.Tensor:
        """``x[index]``: x itself when index is every row in order, else a copy here."""
        if len(index) == x.shape[0] and index == list(range(x.shape[0])):
            return x
        out = self.get(name, len(index), x.shape[1], x.dtype, x.device)
        return torch.index_select(x, 0, ints(index, x.device), out=out)


def ints(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor from a non-empty list; three times faster than torch.tensor(list)."""
    return torch.frombuffer(array("q", values), dtype=torch.int64).to(device)


def floats(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.frombuffer(array("f", values), dtype=torch.float32).to(device)


def at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[i, index[i]]`` for every row i."""
    return x.gather(1, index[:, None]).squeeze(1)
