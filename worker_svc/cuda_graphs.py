"""CUDA graphs for decode-only steps: one captured forward per batch-size bucket.

A decode step of a small model on a GPU is dominated by launching its hundreds of
small kernels, not by running them. A CUDA graph replays the whole forward as one
launch. Graphs fix every shape, so a step of ``n`` decodes runs the graph of the
smallest bucket ``>= n`` with the extra rows padded: a padding row writes no KV
(slot -1), attends to one key of block 0 (finite, and never read back), and its
hidden state is dropped. The block table is padded to the widest a sequence can
have (``max_model_len`` tokens), so one graph serves every context length.

Only decode-only steps replay; anything with a prefill chunk runs eagerly. Graphs
are captured lazily, the first time a bucket is needed, and need kernels that
neither synchronise with the host nor size their launches from tensor contents:
the Triton backend's decode path, not the torch reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker_svc.layers.attention import AttentionMetadata

# Batch sizes with a graph of their own: every size up to 8, then steps of 8 as vLLM
# does, so padding wastes at most 7 rows.
DEFAULT_MAX_BATCH = 256


def buckets(max_batch: int = DEFAULT_MAX_BATCH) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 1, 8))
    return [b for b in sizes if b <= max_batch]


def bucket_for(num_decodes: int, sizes: list[int]) -> int | None:
    """The smallest bucket that holds ``num_decodes`` rows, or None if none does."""
    for size in sizes:
        if size >= num_decodes:
            return size
    return None


@dataclass
class DecodeInputs:
    """A decode-only step's inputs, padded to one bucket."""

    input_ids: torch.Tensor  # [bucket]
    positions: torch.Tensor  # [bucket]
    slot_mapping: torch.Tensor  # [bucket], -1 on padding rows
    block_tables: torch.Tensor  # [bucket, width], padding rows all block 0
    context_lens: torch.Tensor  # [bucket], 1 on padding rows


def pad_decodes(
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    meta: AttentionMetadata,
    bucket: int,
    width: int,
) -> DecodeInputs:
    """The step's decode rows padded to ``bucket`` rows and ``width`` blocks per table."""
    n = meta.num_decodes
    pad = bucket - n
    device = input_ids.device
    tables = torch.zeros(bucket, width, dtype=meta.decode_block_tables.dtype, device=device)
    tables[:n, : meta.decode_block_tables.shape[1]] = meta.decode_block_tables
    return DecodeInputs(
        input_ids=_pad(input_ids, pad, 0),
        positions=_pad(positions, pad, 0),
        slot_mapping=_pad(meta.slot_mapping, pad, -1),
        block_tables=tables,
        context_lens=_pad(meta.decode_context_lens, pad, 1),
    )


def _pad(t: torch.Tensor, count: int, value: int) -> torch.Tensor:
    return torch.cat((t, t.new_full((count,), value))) if count else t


def decode_metadata(inputs: DecodeInputs) -> AttentionMetadata:
    """Attention metadata over ``inputs``' own tensors (a graph reads them in place)."""
    rows = inputs.input_ids.shape[0]
    empty = inputs.block_tables[:0]
    return AttentionMetadata(
        slot_mapping=inputs.slot_mapping,
        num_decodes=rows,
        decode_block_tables=inputs.block_tables,
        decode_context_lens=inputs.context_lens,
        prefill_block_tables=empty,
        prefill_query_start_loc=inputs.context_lens.new_zeros(1),
        prefill_context_lens=inputs.context_lens[:0],
        num_tokens=rows,
    )


class DecodeGraphs:
    """Captures and replays the model's forward for decode-only steps on CUDA."""

    def __init__(self, forward, device: torch.device, width: int, max_batch: int):
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.forward = forward
        self.width = width
        self.sizes = buckets(max_batch)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, DecodeInputs, torch.Tensor]] = {}

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor | None:
        """The hidden states of a decode-only step by replay; None when it has no graph."""
        if meta.num_decodes != meta.num_tokens or meta.num_decodes == 0:
            return None
        bucket = bucket_for(meta.num_decodes, self.sizes)
        if bucket is None:
            return None
        padded = pad_decodes(input_ids, positions, meta, bucket, self.width)
        graph, static, out = self.graphs.get(bucket) or self._capture(bucket, padded)
        for name in ("input_ids", "positions", "slot_mapping", "block_tables", "context_lens"):
            getattr(static, name).copy_(getattr(padded, name), non_blocking=True)
        graph.replay()
        return out[: meta.num_decodes]

    def _capture(self, bucket: int, example: DecodeInputs):
        """Capture the forward of ``bucket`` rows over buffers of its own."""
        static = DecodeInputs(**{k: v.clone() for k, v in vars(example).items()})
        meta = decode_metadata(static)
        # Padding-only rows: the warm-up and capture runs must not write real KV slots.
        static.slot_mapping.fill_(-1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # first-use work (Triton's compile, allocator growth)
                self.forward(static.input_ids, static.positions, meta)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.forward(static.input_ids, static.positions, meta)
        self.graphs[bucket] = (graph, static, out)
        return graph, static, out
