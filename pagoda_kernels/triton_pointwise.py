"""Triton kernels for the pointwise ops: RMS norm, rotary embeddings and SwiGLU.

Same signatures and semantics as :mod:`pagoda_kernels.norm`, :mod:`pagoda_kernels.rotary` and
:mod:`pagoda_kernels.activation`, each in one launch instead of a chain of torch ops with a
temporary between every two. They read strided views as the model makes them (q and
k are views of a fused qkv row), so nothing is copied before a launch.

Each kernel computes in float32 and rounds to the activations' dtype wherever the
torch reference does, so results agree with it to the last bit except where the
order of a sum or the last bit of ``exp``/``rsqrt`` differs. The interpreter casts
float32 to bfloat16 by truncation, so with ``UPCAST`` (interpreter mode) that
rounding is done on the bits instead.
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

RMS_NORM = "rms_norm"
ROTARY = "rotary_embedding"
SILU_AND_MUL = "silu_and_mul"

# Elements one program handles: a row of a large hidden state on a GPU. The interpreter
# pays per program rather than per element, so there a program takes all it can.
_GPU_TILE = 4096
_INTERPRET_TILE = 1 << 16
_MAX_NORM_WIDTH = 1 << 16
_SILU_GPU_COLS = 1024


@triton.jit
def _round(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """Float32 ``x`` rounded to the nearest ``dtype`` (ties to even), as float32."""
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype).to(tl.float32)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def _num_warps(tile: int) -> int:
    """Four warps up to 4096 elements, then one more warp per 1024 (at most 16)."""
    return min(16, max(4, tile // 1024))


def _rows_per_program(num_rows: int, row_block: int, interpret: bool) -> int:
    tile = _INTERPRET_TILE if interpret else _GPU_TILE
    return max(1, min(_pow2(num_rows), tile // row_block))


# --- RMS norm -------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    num_rows,
    num_heads,
    width,
    x_stride_t,
    x_stride_h,
    residual_stride_t,
    residual_stride_h,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    col_mask = cols < width
    mask = (rows < num_rows)[:, None] & col_mask[None, :]
    token = (rows // num_heads).to(tl.int64)
    head = rows % num_heads
    x_offs = (token * x_stride_t + head * x_stride_h)[:, None] + cols[None, :]
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    out_offs = rows.to(tl.int64)[:, None] * width + cols[None, :]
    if HAS_RESIDUAL:
        r_offs = (token * residual_stride_t + head * residual_stride_h)[:, None] + cols[None, :]
        r = tl.load(residual_ptr + r_offs, mask=mask, other=0.0).to(tl.float32)
        x = _round(x + r, x_ptr.dtype.element_ty, UPCAST)
        tl.store(residual_out_ptr + out_offs, x.to(residual_out_ptr.dtype.element_ty), mask=mask)
    mean_square = tl.sum(x * x, axis=1) / width
    h = _round(x * tl.rsqrt(mean_square + eps)[:, None], x_ptr.dtype.element_ty, UPCAST)
    w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    out = _round(w[None, :] * h, out_ptr.dtype.element_ty, UPCAST)
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _norm_blocks(num_rows: int, width: int, interpret: bool) -> tuple[int, int, int]:
    """``(BLOCK_ROWS, BLOCK_COLS, num_warps)``: whole rows, several if they are short."""
    block_cols = _pow2(width)
    if block_cols > _MAX_NORM_WIDTH:
        raise ValueError(f"rms_norm over {width} elements is wider than {_MAX_NORM_WIDTH}")
    block_rows = _rows_per_program(num_rows, block_cols, interpret)
    return block_rows, block_cols, _num_warps(block_rows * block_cols)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[tokens, heads, width]`` with a dense last dimension (a view if it can)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 3:
        return x
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(-1, 1, x.shape[-1])


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``weight * x / rms(x)``, computed in float32 and cast back as transformers does.

    With ``residual``, first ``x = x + residual`` and return ``(normed, x)``: the sum
    is the next residual, so the layer reads the hidden state once.
    """
    check_device(*(t for t in (x, weight, residual) if t is not None))
    if residual is not None:
        # The reference adds in the promoted dtype and normalises in that dtype.
        x = x.to(torch.promote_types(x.dtype, residual.dtype))
        residual = residual.to(x.dtype).expand_as(x)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    new_residual = (
        None if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    )
    if x.numel():
        _launch_rms_norm(x, weight, eps, residual, out, new_residual)
    return out if new_residual is None else (out, new_residual)


def _launch_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    out: torch.Tensor,
    new_residual: torch.Tensor | None,
) -> None:
    x3 = _as_3d(x)
    # Without a residual its pointers are never read or written (a constexpr branch).
    r3 = x3 if residual is None else _as_3d(residual)
    tokens, heads, width = x3.shape
    num_rows = tokens * heads
    block_rows, block_cols, num_warps = _norm_blocks(num_rows, width, INTERPRET)
    LAUNCHES[RMS_NORM] += 1
    _rms_norm_kernel[(triton.cdiv(num_rows, block_rows),)](
        x3, r3, weight.contiguous(), out, out if new_residual is None else new_residual,
        num_rows, heads, width, x3.stride(0), x3.stride(1), r3.stride(0), r3.stride(1),
        eps, HAS_RESIDUAL=residual is not None, BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols, UPCAST=INTERPRET, num_warps=num_warps,
    )  # fmt: skip


# --- rotary embeddings ----------------------------------------------------------------


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    tokens,
    token_mask,
    num_heads,
    stride_t,
    stride_h,
    first,
    second,
    pair_mask,
    cos,
    sin,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Rotate pairs ``(first, second)`` of every head of ``tokens``: ``x*cos + rot(x)*sin``."""
    heads = tl.arange(0, BLOCK_H)
    mask = token_mask[:, None, None] & (heads < num_heads)[None, :, None]
    mask = mask & pair_mask[None, None, :]
    rows = tokens.to(tl.int64)[:, None, None]
    src = src_ptr + rows * stride_t + heads[None, :, None] * stride_h
    dst = dst_ptr + rows * (num_heads * HEAD_DIM) + heads[None, :, None] * HEAD_DIM
    x1 = tl.load(src + first[None, None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + second[None, None, :], mask=mask, other=0.0).to(tl.float32)
    c = cos[:, None, :]
    s = sin[:, None, :]
    dtype = dst_ptr.dtype.element_ty
    out1 = _round(_round(x1 * c, dtype, UPCAST) - _round(x2 * s, dtype, UPCAST), dtype, UPCAST)
    out2 = _round(_round(x2 * c, dtype, UPCAST) + _round(x1 * s, dtype, UPCAST), dtype, UPCAST)
    tl.store(dst + first[None, None, :], out1.to(dtype), mask=mask)
    tl.store(dst + second[None, None, :], out2.to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cos_sin_ptr,
    q_out_ptr,
    k_out_ptr,
    num_tokens,
    num_q_heads,
    num_k_heads,
    q_stride_t,
    q_stride_h,
    k_stride_t,
    k_stride_h,
    cos_sin_stride,
    IS_NEOX: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < num_tokens
    positions = tl.load(positions_ptr + tokens, mask=token_mask, other=0).to(tl.int64)
    pairs = tl.arange(0, BLOCK_HALF)
    pair_mask = pairs < HEAD_DIM // 2
    table = cos_sin_ptr + positions[:, None] * cos_sin_stride + pairs[None, :]
    table_mask = token_mask[:, None] & pair_mask[None, :]
    # cos and sin are rounded to the activations' dtype first, as the reference does.
    dtype = q_out_ptr.dtype.element_ty
    cos = _round(tl.load(table, mask=table_mask, other=0.0).to(tl.float32), dtype, UPCAST)
    sin = tl.load(table + HEAD_DIM // 2, mask=table_mask, other=0.0).to(tl.float32)
    sin = _round(sin, dtype, UPCAST)
    if IS_NEOX:  # the two halves of each head
        first = pairs
        second = pairs + HEAD_DIM // 2
    else:  # interleaved pairs (GPT-J)
        first = 2 * pairs
        second = 2 * pairs + 1
    _rotate_heads(
        q_ptr, q_out_ptr, tokens, token_mask, num_q_heads, q_stride_t, q_stride_h,
        first, second, pair_mask, cos, sin, HEAD_DIM, BLOCK_QH, UPCAST,
    )  # fmt: skip
    _rotate_heads(
        k_ptr, k_out_ptr, tokens, token_mask, num_k_heads, k_stride_t, k_stride_h,
        first, second, pair_mask, cos, sin, HEAD_DIM, BLOCK_KH, UPCAST,
    )  # fmt: skip


def _rotary_blocks(
    num_tokens: int, q_heads: int, k_heads: int, head_dim: int, interpret: bool
) -> tuple[int, int, int, int, int]:
    """``(BLOCK_T, BLOCK_QH, BLOCK_KH, BLOCK_HALF, num_warps)``: all heads of some tokens."""
    block_qh, block_kh = _pow2(q_heads), _pow2(k_heads)
    block_half = _pow2(head_dim // 2)
    per_token = block_qh * block_half
    block_t = _rows_per_program(num_tokens, per_token, interpret)
    return block_t, block_qh, block_kh, block_half, _num_warps(block_t * per_token)


def _check_rotary_shapes(query: torch.Tensor, key: torch.Tensor, table: torch.Tensor) -> None:
    if key.dtype != query.dtype:
        raise ValueError(f"query ({query.dtype}) and key ({key.dtype}) dtypes differ")
    head_dim = query.shape[-1]
    if key.shape[-1] != head_dim or table.shape[-1] != head_dim:
        raise ValueError(
            f"head dims differ: query {head_dim}, key {key.shape[-1]}, "
            f"cos_sin_cache {table.shape[-1]} (the whole head is rotated)"
        )


def _dense_heads(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``query [T, H, D]`` and ``key [T, KVH, D]`` by their token ``positions``.

    ``cos_sin_cache [max_position, D]`` holds ``cos`` in its first half and ``sin`` in
    its second (float32). The neox style rotates the two halves of each head
    (Llama, Mistral, Qwen); the GPT-J style rotates interleaved pairs. cos and sin
    are cast to the activations' dtype first, as transformers does.
    """
    check_device(positions, query, key, cos_sin_cache)
    _check_rotary_shapes(query, key, cos_sin_cache)
    num_tokens, q_heads, head_dim = query.shape
    k_heads = key.shape[1]
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    if num_tokens == 0:
        return q_out, k_out
    query, key, table = _dense_heads(query), _dense_heads(key), _dense_heads(cos_sin_cache)
    block_t, block_qh, block_kh, block_half, num_warps = _rotary_blocks(
        num_tokens, q_heads, k_heads, head_dim, INTERPRET
    )
    LAUNCHES[ROTARY] += 1
    _rotary_kernel[(triton.cdiv(num_tokens, block_t),)](
        positions.contiguous(), query, key, table, q_out, k_out,
        num_tokens, q_heads, k_heads, query.stride(0), query.stride(1),
        key.stride(0), key.stride(1), table.stride(0),
        IS_NEOX=bool(is_neox), HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_QH=block_qh,
        BLOCK_KH=block_kh, BLOCK_HALF=block_half, UPCAST=INTERPRET, num_warps=num_warps,
    )  # fmt: skip
    return q_out, k_out


# --- SwiGLU ---------------------------------------------------------------------------


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    num_rows,
    width,
    x_stride,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (rows < num_rows)[:, None] & (cols < width)[None, :]
    rows = rows.to(tl.int64)[:, None]
    gate_ptr = x_ptr + rows * x_stride + cols[None, :]
    gate = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptr + width, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    silu = _round(gate / (1.0 + tl.exp(-gate)), dtype, UPCAST)
    out = _round(silu * up, dtype, UPCAST)
    tl.store(out_ptr + rows * width + cols[None, :], out.to(dtype), mask=mask)


def _silu_blocks(num_rows: int, width: int, interpret: bool) -> tuple[int, int, int]:
    """``(BLOCK_ROWS, BLOCK_COLS, num_warps)``."""
    block_cols = min(_pow2(width), _INTERPRET_TILE if interpret else _SILU_GPU_COLS)
    block_rows = _rows_per_program(num_rows, block_cols, interpret)
    return block_rows, block_cols, _num_warps(block_rows * block_cols)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` along the last dimension (SwiGLU)."""
    check_device(x)
    width = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], width), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    num_rows = rows.shape[0]
    block_rows, block_cols, num_warps = _silu_blocks(num_rows, width, INTERPRET)
    grid = (triton.cdiv(num_rows, block_rows), triton.cdiv(width, block_cols))
    LAUNCHES[SILU_AND_MUL] += 1
    _silu_and_mul_kernel[grid](
        rows, out, num_rows, width, rows.stride(0),
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, UPCAST=INTERPRET, num_warps=num_warps,
    )  # fmt: skip
    return out


# --- ahead-of-time variants -----------------------------------------------------------


def _signature(
    fn: triton.JITFunction, pointers: dict[str, str], floats: tuple[str, ...] = ()
) -> dict[str, str]:
    """``fn``'s signature: the given pointers, fp32 ``floats``, its constexprs, i32 the rest."""
    signature = {p.name: "constexpr" if p.is_constexpr else "i32" for p in fn.params}
    signature.update(pointers)
    signature.update(dict.fromkeys(floats, "fp32"))
    return signature


def _name(kernel: str, dtype: torch.dtype, *tags: str) -> str:
    return "_".join((kernel, str(dtype).removeprefix("torch."), *tags))


def _rms_norm_variants(dtype: torch.dtype) -> list[AotVariant]:
    """Hidden 4096 (one row a program), +/- residual; per-head 128 (many rows, no residual)."""
    p = ptr(dtype)
    pointers = dict.fromkeys(
        ("x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "residual_out_ptr"), p
    )
    signature = _signature(_rms_norm_kernel, pointers, ("eps",))
    variants = []
    for rows, width, residuals in ((256, 4096, (False, True)), (256 * 32, 128, (False,))):
        block_rows, block_cols, num_warps = _norm_blocks(rows, width, interpret=False)
        for has_residual in residuals:
            constexprs = {
                "HAS_RESIDUAL": has_residual,
                "BLOCK_ROWS": block_rows,
                "BLOCK_COLS": block_cols,
                "UPCAST": False,
            }
            tag = f"w{width}" + ("_residual" if has_residual else "")
            variants.append(
                AotVariant(
                    _name(RMS_NORM, dtype, tag), _rms_norm_kernel, signature, constexprs, num_warps
                )
            )
    return variants


def _rotary_variants(dtype: torch.dtype) -> list[AotVariant]:
    """Head dims 64 and 128 (32 query and 8 key heads), neox and GPT-J."""
    p = ptr(dtype)
    pointers = dict.fromkeys(("q_ptr", "k_ptr", "q_out_ptr", "k_out_ptr"), p)
    pointers.update(positions_ptr=ptr(torch.int64), cos_sin_ptr=ptr(torch.float32))
    signature = _signature(_rotary_kernel, pointers)
    variants = []
    for head_dim in (64, 128):
        block_t, block_qh, block_kh, block_half, num_warps = _rotary_blocks(
            256, 32, 8, head_dim, interpret=False
        )
        for is_neox in (True, False):
            constexprs = {
                "IS_NEOX": is_neox,
                "HEAD_DIM": head_dim,
                "BLOCK_T": block_t,
                "BLOCK_QH": block_qh,
                "BLOCK_KH": block_kh,
                "BLOCK_HALF": block_half,
                "UPCAST": False,
            }
            tag = f"d{head_dim}_" + ("neox" if is_neox else "gptj")
            variants.append(
                AotVariant(
                    _name(ROTARY, dtype, tag), _rotary_kernel, signature, constexprs, num_warps
                )
            )
    return variants


def _silu_variants(dtype: torch.dtype) -> list[AotVariant]:
    """An intermediate size of 14336 (Llama 3 8B)."""
    signature = _signature(_silu_and_mul_kernel, dict.fromkeys(("x_ptr", "out_ptr"), ptr(dtype)))
    block_rows, block_cols, num_warps = _silu_blocks(256, 14336, interpret=False)
    constexprs = {"BLOCK_ROWS": block_rows, "BLOCK_COLS": block_cols, "UPCAST": False}
    return [
        AotVariant(
            _name(SILU_AND_MUL, dtype), _silu_and_mul_kernel, signature, constexprs, num_warps
        )
    ]


def aot_variants() -> list[AotVariant]:
    """Every kernel in every float dtype, with each constexpr branch and GPU launch blocks."""
    variants = []
    for dtype in FLOAT_DTYPES:
        variants += _rms_norm_variants(dtype)
        variants += _rotary_variants(dtype)
        variants += _silu_variants(dtype)
    return variants
