"""Paged attention in Triton: prefill chunks with a cached prefix, and decodes.

Same signatures and conventions as the torch reference in ``pagoda_kernels/attention.py``
(caches ``[num_blocks, block_size, kv_heads, head_dim]``, one block table row per
sequence, ``context_lens`` counting the step's own tokens, GQA by ``h // group``,
optional sliding window).

One program owns a tile of query rows of one sequence and one KV head: the rows are
(token, query head) pairs of that KV group, so every query head that shares a KV
head reads each key once, for any group size. It walks the sequence's keys in tiles
of ``BLOCK_N``, looking each key's block up in the block table (a tile may span
several cache blocks, so block size and tile size are independent), with an online
softmax in float32. Tiles wholly in a row's future or before its sliding window are
never visited.

Decodes are the same kernel with one query token per sequence. When there are too
few (sequence, KV head) programs to fill the GPU and contexts are long, the split-K
variant cuts each context into partitions of ``PARTITION`` keys, one program each,
and a second kernel merges the partial softmaxes.
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

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table_row, key_start, rows_pos, hi,
    window, qk_scale, stride_kb, stride_ks, stride_kh, kv_head, offs_d, d_mask,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, SLIDING: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Fold keys ``key_start .. key_start + BLOCK_N`` (those below ``hi``) into the softmax."""
    offs_n = key_start + tl.arange(0, BLOCK_N)
    in_range = offs_n < hi
    block_ids = tl.load(block_table_row + offs_n // BLOCK_SIZE, mask=in_range, other=0)
    slots = block_ids.to(tl.int64) * stride_kb + (offs_n % BLOCK_SIZE) * stride_ks
    kv_offs = slots[:, None] + kv_head * stride_kh + offs_d[None, :]
    kv_mask = in_range[:, None] & d_mask[None, :]
    k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    visible = (offs_n[None, :] <= rows_pos[:, None]) & in_range[None, :]
    if SLIDING:
        visible = visible & (offs_n[None, :] > rows_pos[:, None] - window)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead
    # keeps its probabilities at exactly 0 rather than NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, query_start_loc_ptr,
    context_lens_ptr, qk_scale, window,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    SLIDING: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Rows ``tile * BLOCK_M ..`` of (token, head-in-group) pairs of one sequence, one KV head."""
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len * GROUP:
        return
    ctx_len = tl.load(context_lens_ptr + seq)

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    token = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_mask = token < q_len
    rows_pos = ctx_len - q_len + token
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_DIM

    q_offs = (q_start + token).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
    q_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + q_offs + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # Keys from the first visible to the tile's last row (causal: nothing later).
    last_pos = ctx_len - q_len + tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1)
    hi = last_pos + 1
    lo = 0
    if SLIDING:
        first_pos = ctx_len - q_len + (tile * BLOCK_M) // GROUP
        lo = tl.maximum(first_pos - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for key_start in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table_row, key_start, rows_pos,
            hi, window, qk_scale, stride_kb, stride_ks, stride_kh, kv_head, offs_d, d_mask,
            BLOCK_N, BLOCK_SIZE, SLIDING, UPCAST, DOT_PRECISION,
        )  # fmt: skip

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    o_offs = (q_start + token).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
    tl.store(out_ptr + o_offs + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, part_acc_ptr, part_ml_ptr, block_tables_ptr,
    context_lens_ptr, qk_scale, window,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    PARTITION: tl.constexpr, SLIDING: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One partition of one decode's keys for one KV group; writes an unnormalised part.

    Parts are laid out ``[seq, kv_head, split, BLOCK_M, HEAD_PAD]`` (accumulators) and
    ``[seq, kv_head, split, 2, BLOCK_M]`` (running max, then sum) in float32.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    ctx_len = tl.load(context_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_M)
    head = kv_head * GROUP + rows
    row_mask = rows < GROUP
    rows_pos = tl.zeros([BLOCK_M], dtype=tl.int32) + ctx_len - 1
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_DIM
    q_offs = seq.to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    lo = split * PARTITION
    hi = tl.minimum(lo + PARTITION, ctx_len)
    if SLIDING:
        lo = tl.maximum(lo, ((ctx_len - window) // BLOCK_N) * BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for key_start in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table_row, key_start, rows_pos,
            hi, window, qk_scale, stride_kb, stride_ks, stride_kh, kv_head, offs_d, d_mask,
            BLOCK_N, BLOCK_SIZE, SLIDING, UPCAST, DOT_PRECISION,
        )  # fmt: skip

    part = (seq.to(tl.int64) * num_kv_heads + kv_head) * num_splits + split
    acc_offs = part * BLOCK_M * HEAD_PAD + rows[:, None] * HEAD_PAD + offs_d[None, :]
    tl.store(part_acc_ptr + acc_offs, acc)
    tl.store(part_ml_ptr + part * 2 * BLOCK_M + rows, m_i)
    tl.store(part_ml_ptr + part * 2 * BLOCK_M + BLOCK_M + rows, l_i)


@triton.jit
def _decode_reduce_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, context_lens_ptr, stride_ot, stride_oh, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, PARTITION: tl.constexpr,
):  # fmt: skip
    """Merge one decode's partial softmaxes (only the partitions its context reaches)."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    num_kv_heads = tl.num_programs(1)
    ctx_len = tl.load(context_lens_ptr + seq)
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    used = tl.minimum(tl.cdiv(ctx_len, PARTITION), num_splits)
    for split in range(0, used):
        part = (seq.to(tl.int64) * num_kv_heads + kv_head) * num_splits + split
        m_s = tl.load(part_ml_ptr + part * 2 * BLOCK_M + rows)
        l_s = tl.load(part_ml_ptr + part * 2 * BLOCK_M + BLOCK_M + rows)
        a_s = tl.load(part_acc_ptr + part * BLOCK_M * HEAD_PAD + rows[:, None] * HEAD_PAD + offs_d)
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        old = tl.math.exp2(m - m_safe)
        new = tl.math.exp2(m_s - m_safe)
        total = total * old + l_s * new
        acc = acc * old[:, None] + a_s * new[:, None]
        m = m_new
    total = tl.where(total == 0.0, 1.0, total)
    out = acc / total[:, None]
    head = kv_head * GROUP + rows
    mask = (rows < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o_offs = seq.to(tl.int64) * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# Keys per split-K partition, and the number of (sequence, KV head) programs below
# which decodes are split: a GPU needs a few programs per SM to hide memory latency.
PARTITION = 512
SPLIT_BELOW_PROGRAMS = 256


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One query token per sequence (``[S, heads, head_dim]``) at position ``context_len - 1``.

    Long contexts with few programs take the split-K path. The longest possible
    context is read off the block table's width, not ``context_lens``, so choosing
    costs no device-to-host copy.
    """
    num_seqs, _, _ = query.shape
    kv_heads = key_cache.shape[2]
    max_context = block_tables.shape[1] * key_cache.shape[1]
    if num_seqs * kv_heads < SPLIT_BELOW_PROGRAMS and max_context > 2 * PARTITION:
        return decode_split_k(
            query, key_cache, value_cache, block_tables, context_lens, scale, sliding_window
        )
    starts = torch.arange(num_seqs + 1, dtype=torch.int32, device=query.device)
    return _launch(
        "paged_attention_decode",
        query, key_cache, value_cache, block_tables, starts, context_lens, scale,
        sliding_window, max_q_len=1,
    )  # fmt: skip


def paged_attention_prefill(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Chunks of new tokens packed in ``query [T, heads, head_dim]``, causal over their sequence.

    The grid is sized by the longest chunk; the chunk lengths are read once to
    find it (a host copy per call, as the torch reference makes too).
    """
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    max_q_len = int(q_lens.max()) if q_lens.numel() else 0
    return _launch(
        "paged_attention_prefill",
        query, key_cache, value_cache, block_tables, query_start_loc, context_lens, scale,
        sliding_window, max_q_len=max_q_len,
    )  # fmt: skip


def _launch(
    name, query, key_cache, value_cache, block_tables, query_start_loc, context_lens, scale,
    sliding_window, max_q_len,
) -> torch.Tensor:  # fmt: skip
    shape = _Shape.of(query, key_cache, value_cache, block_tables)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if query.shape[0] == 0 or max_q_len == 0:
        return out
    block_m, block_n, warps = _tiles(shape, max_q_len)
    grid = (query_start_loc.shape[0] - 1, triton.cdiv(max_q_len * shape.group, block_m), shape.kvh)
    LAUNCHES[name] += 1
    _paged_attention_kernel[grid](
        query, key_cache, value_cache, out, block_tables, query_start_loc, context_lens,
        scale * LOG2E, sliding_window or 0,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        GROUP=shape.group, HEAD_DIM=shape.head_dim, HEAD_PAD=shape.head_pad,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=shape.block_size,
        SLIDING=sliding_window is not None, UPCAST=INTERPRET,
        DOT_PRECISION=_dot_precision(query.dtype), num_warps=warps,
    )  # fmt: skip
    return out


def decode_split_k(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    partition: int = PARTITION,
) -> torch.Tensor:
    """Decode attention with each context cut into partitions of ``partition`` keys."""
    shape = _Shape.of(query, key_cache, value_cache, block_tables)
    num_seqs = query.shape[0]
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_seqs == 0:
        return out
    block_m = _decode_rows(shape.group)
    block_n = min(partition, _decode_block_n(shape))
    if partition % block_n:
        raise ValueError(f"partition {partition} is not a multiple of the key tile {block_n}")
    splits = triton.cdiv(block_tables.shape[1] * shape.block_size, partition)
    part_acc = torch.empty(
        num_seqs, shape.kvh, splits, block_m, shape.head_pad,
        dtype=torch.float32, device=query.device,
    )  # fmt: skip
    part_ml = torch.empty(
        num_seqs, shape.kvh, splits, 2, block_m, dtype=torch.float32, device=query.device
    )
    common = {
        "GROUP": shape.group, "HEAD_DIM": shape.head_dim, "HEAD_PAD": shape.head_pad,
        "BLOCK_M": block_m, "PARTITION": partition,
    }  # fmt: skip
    LAUNCHES["paged_attention_decode_split"] += 1
    _decode_split_kernel[(num_seqs, shape.kvh, splits)](
        query, key_cache, value_cache, part_acc, part_ml, block_tables, context_lens,
        scale * LOG2E, sliding_window or 0,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        splits, BLOCK_N=block_n, BLOCK_SIZE=shape.block_size,
        SLIDING=sliding_window is not None, UPCAST=INTERPRET,
        DOT_PRECISION=_dot_precision(query.dtype), num_warps=4, **common,
    )  # fmt: skip
    _decode_reduce_kernel[(num_seqs, shape.kvh)](
        part_acc, part_ml, out, context_lens, out.stride(0), out.stride(1), splits,
        num_warps=4, **common,
    )  # fmt: skip
    return out


class _Shape:
    """The sizes a launch needs, checked once."""

    def __init__(self, heads, kvh, head_dim, block_size):
        if heads % kvh:
            raise ValueError(f"{heads} query heads do not split into {kvh} KV heads")
        self.heads, self.kvh, self.head_dim, self.block_size = heads, kvh, head_dim, block_size
        self.group = heads // kvh
        self.head_pad = max(16, triton.next_power_of_2(head_dim))

    @classmethod
    def of(cls, query, key_cache, value_cache, block_tables) -> _Shape:
        check_device(query, key_cache, value_cache, block_tables)
        if key_cache.shape != value_cache.shape or key_cache.stride() != value_cache.stride():
            raise ValueError("key and value caches must have the same shape and layout")
        if key_cache.stride(3) != 1 or query.stride(2) != 1:
            raise ValueError("the head dimension of the query and the caches must be contiguous")
        if query.dtype not in FLOAT_DTYPES or key_cache.dtype not in FLOAT_DTYPES:
            raise ValueError(f"unsupported dtypes {query.dtype} / {key_cache.dtype}")
        _, block_size, kvh, head_dim = key_cache.shape
        if query.shape[2] != head_dim:
            raise ValueError(f"query head_dim {query.shape[2]} != cache head_dim {head_dim}")
        return cls(query.shape[1], kvh, head_dim, block_size)


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 models get exact float32 products, not TF32's 10-bit mantissas."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _decode_rows(group: int) -> int:
    """Rows of a decode tile: the group's query heads, at least the 16 ``tl.dot`` needs."""
    return max(16, triton.next_power_of_2(group))


def _decode_block_n(shape: _Shape) -> int:
    # The interpreter pays per loop iteration, not per element: take big tiles there.
    if INTERPRET:
        return 128
    return 64 if shape.head_pad <= 128 else 32


def _tiles(shape: _Shape, max_q_len: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a launch: small row tiles for decodes."""
    if max_q_len == 1:
        return _decode_rows(shape.group), _decode_block_n(shape), 4
    if INTERPRET:
        return 128, 128, 4
    rows = min(128, max(16, triton.next_power_of_2(max_q_len * shape.group)))
    block_n = 64 if shape.head_pad <= 128 else 32
    return rows, block_n, 8 if rows * shape.head_pad >= 128 * 128 else 4


def aot_variants() -> list[AotVariant]:
    """Every attention kernel for each dtype, head size and masking branch."""
    variants = []
    for dtype in FLOAT_DTYPES:
        # A power-of-two head without a window, and a padded head (96) with a window
        # and a group of 8; the merge kernel has no window branch, so it is taken once.
        variants += _variants_for(dtype, 128, 4, False)
        variants += [v for v in _variants_for(dtype, 96, 8, True) if "reduce" not in v.name]
    return variants


def _variants_for(dtype, head_dim, group, sliding) -> list[AotVariant]:
    shape = _Shape(group * 2, 2, head_dim, 16)
    tag = f"{str(dtype).removeprefix('torch.')}_d{head_dim}_g{group}{'_sw' if sliding else ''}"
    scalars = {"qk_scale": "fp32", "window": "i32"}
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    base = {
        "GROUP": group, "HEAD_DIM": head_dim, "HEAD_PAD": shape.head_pad,
        "BLOCK_SIZE": 16, "SLIDING": sliding, "UPCAST": False,
        "DOT_PRECISION": _dot_precision(dtype),
    }  # fmt: skip
    tensors = {"q_ptr": ptr(dtype), "k_cache_ptr": ptr(dtype), "v_cache_ptr": ptr(dtype)}
    tables = {"block_tables_ptr": "*i32", "context_lens_ptr": "*i32"}
    out = []
    for name, max_q in (("prefill", 512), ("decode", 1)):
        block_m, block_n, warps = _tiles(shape, max_q)
        if INTERPRET:  # the tile sizes a GPU would get
            block_m = 128 if max_q > 1 else block_m
            block_n = 64
        consts = {**base, "BLOCK_M": block_m, "BLOCK_N": block_n}
        sig = {
            **tensors, "out_ptr": ptr(dtype), **tables, "query_start_loc_ptr": "*i32",
            **scalars, **ints("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb",
                              "stride_ks", "stride_kh", "stride_bt"),
            **{k: "constexpr" for k in consts},
        }  # fmt: skip
        out.append(AotVariant(f"attn_{name}_{tag}", _paged_attention_kernel, sig, consts, warps))
    block_m = _decode_rows(group)
    split_consts = {**base, "BLOCK_M": block_m, "BLOCK_N": 64, "PARTITION": PARTITION}
    split_sig = {
        **tensors, "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", **tables, **scalars,
        **ints("stride_qt", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_bt",
               "num_splits"),
        **{k: "constexpr" for k in split_consts},
    }  # fmt: skip
    out.append(AotVariant(f"attn_split_{tag}", _decode_split_kernel, split_sig, split_consts))
    reduce_consts = {k: split_consts[k] for k in ("GROUP", "HEAD_DIM", "HEAD_PAD", "BLOCK_M")}
    reduce_consts["PARTITION"] = PARTITION
    reduce_sig = {
        "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "out_ptr": ptr(dtype),
        "context_lens_ptr": "*i32", **ints("stride_ot", "stride_oh", "num_splits"),
        **{k: "constexpr" for k in reduce_consts},
    }  # fmt: skip
    out.append(AotVariant(f"attn_reduce_{tag}", _decode_reduce_kernel, reduce_sig, reduce_consts))
    return out
