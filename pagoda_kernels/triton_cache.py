"""Triton kernel that writes a step's new keys and values into the paged KV cache.

Same signature and semantics as :func:`pagoda_kernels.cache.reshape_and_cache`, without its
host-side filtering of padding slots (``slot_mapping < 0`` forces a device sync) and
its two gathers: one launch copies each token's key and value row straight to its
slot and skips slots of -1. The copy does no arithmetic, so it needs no ``UPCAST``
for the interpreter's bfloat16 and keeps every bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda_kernels.triton_support import (
    FLOAT_DTYPES,
    INTERPRET,
    LAUNCHES,
    AotVariant,
    check_device,
    ptr,
)

KERNEL = "reshape_and_cache"

# Elements a program copies: about one token's row of a large model on a GPU; the
# interpreter pays per program, so there each program takes as many tokens as it can.
_GPU_TILE = 2048
_INTERPRET_TILE = 1 << 16
_MAX_ROW_BLOCK = 1024


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_ptr,
    num_tokens,
    row_size,
    block_size,
    key_stride,
    value_stride,
    key_cache_block_stride,
    key_cache_slot_stride,
    value_cache_block_stride,
    value_cache_slot_stride,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    slots = tl.load(slot_ptr + tokens, mask=tokens < num_tokens, other=-1).to(tl.int64)
    mask = (slots >= 0)[:, None] & (cols < row_size)[None, :]
    block = slots // block_size
    within = slots % block_size
    rows = tokens.to(tl.int64)[:, None]
    key = tl.load(key_ptr + rows * key_stride + cols[None, :], mask=mask)
    value = tl.load(value_ptr + rows * value_stride + cols[None, :], mask=mask)
    key_dst = block * key_cache_block_stride + within * key_cache_slot_stride
    value_dst = block * value_cache_block_stride + within * value_cache_slot_stride
    tl.store(key_cache_ptr + key_dst[:, None] + cols[None, :], key, mask=mask)
    tl.store(value_cache_ptr + value_dst[:, None] + cols[None, :], value, mask=mask)


def _launch_blocks(num_tokens: int, row_size: int, interpret: bool) -> tuple[int, int]:
    """``(BLOCK_T, BLOCK_R)``: tokens and row elements one program copies."""
    tile = _INTERPRET_TILE if interpret else _GPU_TILE
    block_r = min(triton.next_power_of_2(row_size), tile if interpret else _MAX_ROW_BLOCK)
    block_t = max(1, min(triton.next_power_of_2(max(num_tokens, 1)), tile // block_r))
    return block_t, block_r


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x [T, heads, head_dim]`` with each token's heads dense (any token stride)."""
    _, heads, head_dim = x.shape
    if x.stride(2) == 1 and (x.stride(1) == head_dim or heads == 1):
        return x
    return x.contiguous()


def _check_cache(cache: torch.Tensor) -> None:
    _, _, heads, head_dim = cache.shape
    if cache.stride(3) != 1 or (cache.stride(2) != head_dim and heads != 1):
        raise ValueError(f"each cache slot must be dense, got strides {cache.stride()}")


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``key``/``value`` rows ``[T, kv_heads, head_dim]`` at their cache slots.

    The caches are ``[num_blocks, block_size, kv_heads, head_dim]``; slot ``s`` is
    row ``s % block_size`` of block ``s // block_size``. A slot of -1 marks a padding
    token whose key and value are not stored.
    """
    check_device(key, value, key_cache, value_cache, slot_mapping)
    _check_cache(key_cache)
    _check_cache(value_cache)
    _, block_size, kv_heads, head_dim = key_cache.shape
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    key = _rows(key.to(key_cache.dtype))
    value = _rows(value.to(value_cache.dtype))
    row_size = kv_heads * head_dim
    block_t, block_r = _launch_blocks(num_tokens, row_size, INTERPRET)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(row_size, block_r))
    LAUNCHES[KERNEL] += 1
    _reshape_and_cache_kernel[grid](
        key, value, key_cache, value_cache, slot_mapping.contiguous(),
        num_tokens, row_size, block_size, key.stride(0), value.stride(0),
        key_cache.stride(0), key_cache.stride(1), value_cache.stride(0), value_cache.stride(1),
        BLOCK_T=block_t, BLOCK_R=block_r, num_warps=4,
    )  # fmt: skip


def aot_variants() -> list[AotVariant]:
    """Every cache dtype, with the blocks a GPU launch picks for head dims 64 and 128."""
    variants = []
    for dtype in FLOAT_DTYPES:
        for kv_heads, head_dim in ((8, 128), (2, 64)):
            block_t, block_r = _launch_blocks(256, kv_heads * head_dim, interpret=False)
            signature = {name: "i32" for name in _reshape_and_cache_kernel.arg_names}
            signature.update(
                key_ptr=ptr(dtype),
                value_ptr=ptr(dtype),
                key_cache_ptr=ptr(dtype),
                value_cache_ptr=ptr(dtype),
                slot_ptr=ptr(torch.int64),
                BLOCK_T="constexpr",
                BLOCK_R="constexpr",
            )
            variants.append(
                AotVariant(
                    name=f"{KERNEL}_{dtype}_h{head_dim}".replace("torch.", ""),
                    fn=_reshape_and_cache_kernel,
                    signature=signature,
                    constexprs={"BLOCK_T": block_t, "BLOCK_R": block_r},
                )
            )
    return variants
