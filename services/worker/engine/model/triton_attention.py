"""Paged attention in Triton for the CUDA path: decode (split-K) and varlen prefill.

The cache of one layer is two tensors ``[num_blocks, block_size, num_kv_heads, head_dim]``
(the layout of ``attention.py``); the step's new keys/values are already written to it.
Both kernels read K/V blocks in place through the block table: each tile of ``BLOCK_N``
positions looks up its block ids and loads ``[BLOCK_N, head_dim]`` rows straight from the
cache, so there is no gather copy and no dense mask, and the memory traffic is the
context itself. All query heads that share a KV head are rows of one program, so each
K/V tile is loaded once per GQA group. Softmax is online (flash-attention style) with
fp32 accumulation, in log2 units (``exp2`` of scores pre-multiplied by log2(e)).

- ``paged_decode_attention``: one query per sequence. At small batch the
  ``batch x kv_heads`` programs cannot fill the GPU, so the context is also split over
  a grid dimension (flash-decoding): each split writes a partial (max, sum, acc) and a
  small kernel combines them with log-sum-exp. The number of splits comes from the
  block table's width (a host shape), never from ``ctx_lens`` values, so the grid is
  fixed for a batch size and a CUDA graph can capture it once; splits past a
  sequence's context do no work, and rows with ``ctx_len == 0`` (graph padding) get 0.
- ``paged_prefill_attention``: a flat batch of chunks (``cu_seqlens_q``), each causal
  over its cached prefix plus itself; a sequence may be a decode (one query), so one
  call can serve a mixed batch.

Neither function syncs with the host (no ``.item()``, no branching on tensor values).
Where triton is not installed, ``HAS_TRITON`` is False and the functions raise
``RuntimeError``; callers check ``HAS_TRITON`` before choosing this path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the torch SDPA path in attention.py is used instead
    HAS_TRITON = False

# Decode: the context is split into pieces of at least this many positions (512 keeps a
# split's work well above the combine cost while giving a 4k context 8 splits), and only
# as far as it takes to give the GPU this many programs (two waves on an H100/H200's 132
# SMs): at large batch the batch x kv-heads programs fill it, and splits would only add
# partials to combine.
PARTITION_SIZE = 512
TARGET_DECODE_PROGRAMS = 264
_LOG2E = 1.4426950408889634
# Launch shapes, chosen from a sweep on an H200 (scripts/device/tune_attention.py, bf16;
# tiles of positions are >= 16 for tl.dot). Decode, as (positions per K/V tile, warps,
# pipeline stages): head_dim 128 with many programs streams best in small tiles of few
# warps; with few programs (small batch, long context) in large tiles of many warps;
# head_dim 64 in large tiles of 2 warps.
_DECODE_MANY_PROGRAMS = 1024  # batch * kv_heads from which a head_dim-128 step has "many"
_DECODE_D128_MANY = (32, 2, 3)
_DECODE_D128_FEW = (128, 8, 3)
_DECODE_SMALL_D = (128, 2, 1)
# Prefill, as (rows per program: query tokens x padded GQA group, positions per tile,
# warps). fp32 dots need more registers, so fp32 caches use half the rows.
_PREFILL_D128 = (128, 32, 4)
_PREFILL_SMALL_D = (64, 64, 4)
# Tests and the tuning script may pin a launch shape: (block_n, warps, stages) for
# decode, (block_m, block_n, warps) for prefill; None: the rules above.
DECODE_OVERRIDE: tuple[int, int, int] | None = None
PREFILL_OVERRIDE: tuple[int, int, int] | None = None


def _decode_config(head_dim: int, num_programs: int) -> tuple[int, int, int]:
    if DECODE_OVERRIDE is not None:
        return DECODE_OVERRIDE
    if head_dim < 128:
        return _DECODE_SMALL_D
    return _DECODE_D128_MANY if num_programs >= _DECODE_MANY_PROGRAMS else _DECODE_D128_FEW


def _prefill_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    block_m, block_n, warps = (PREFILL_OVERRIDE or
                               (_PREFILL_D128 if head_dim >= 128 else _PREFILL_SMALL_D))
    if dtype == torch.float32 and PREFILL_OVERRIDE is None:
        block_m //= 2
    return block_m, block_n, warps


# Splits combined per step of the reduce kernel.
_MAX_SPLIT_TILE = 16


def _jit(fn: Callable[..., Any]) -> Any:
    # Without triton the kernels are plain (never called) functions; `tl` in their
    # annotations is never evaluated (postponed annotations).
    return triton.jit(fn) if HAS_TRITON else fn


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton_attention needs triton (pip install triton); "
                           "check triton_attention.HAS_TRITON before using it")


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@_jit
def _attend(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, table_row_ptr, kv_head, lo, hi,
            last_pos, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            qk_scale, offs_d, d_mask,
            BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
            DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """Online softmax of q's rows over one sequence's positions [lo, hi).

    q: [M, BLOCK_D] (cache dtype; fp32 with DOT_FP32); acc: [M, BLOCK_D] fp32; l_i, m_i:
    [M] fp32, the running sum and max of the log2-scaled scores; last_pos: [M], the last
    position each row may see (read only when CAUSAL). Returns the updated (acc, l_i, m_i).
    """
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n  # [BLOCK_N]
        in_range = pos < hi
        # One block id per position (BLOCK_N / BLOCK_SIZE distinct, cached loads); int64
        # so block * stride cannot overflow on large caches.
        block_ids = tl.load(table_row_ptr + pos // BLOCK_SIZE, mask=in_range, other=0)
        block_ids = block_ids.to(tl.int64)
        slots = pos % BLOCK_SIZE
        kv_mask = in_range[:, None] & d_mask[None, :]
        # [BLOCK_N, BLOCK_D]: each row is head_dim contiguous elements (coalesced).
        k = tl.load(k_cache_ptr + block_ids[:, None] * stride_kb + slots[:, None] * stride_kt
                    + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [M, BLOCK_N] fp32
        visible = in_range[None, :]
        if CAUSAL:
            visible = visible & (pos[None, :] <= last_pos[:, None])
        s = tl.where(visible, s * qk_scale, float("-inf"))
        # m_i starts finite (-1e30), so a row with nothing visible yet never computes
        # -inf - -inf: its p is 0 and alpha is 1.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])  # [M, BLOCK_N]
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + block_ids[:, None] * stride_vb + slots[:, None] * stride_vt
                    + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, ctx_lens_ptr, out_ptr,
                   part_acc_ptr, part_l_ptr, part_m_ptr,
                   stride_qb, stride_qh, stride_ob, stride_oh,
                   stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                   stride_table, max_ctx_len, partition_size, num_splits, qk_scale,
                   NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_N: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """Grid (batch, kv_heads, num_splits): one split of one sequence for one GQA group.

    With SINGLE_SPLIT the normalized output goes straight to out; else the partial
    acc [GROUP, D], sum [GROUP] and max [GROUP] go to the part_* buffers
    ([B, H, num_splits(, D)] fp32) for _combine_splits_kernel.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # Clamped to the table's width so a bad length cannot read past the row.
    ctx_len = tl.minimum(tl.load(ctx_lens_ptr + seq), max_ctx_len)
    lo = split * partition_size
    hi = tl.minimum(lo + partition_size, ctx_len)  # hi <= lo: nothing to do

    offs_g = tl.arange(0, GROUP_P)  # rows: the group's query heads, padded to >= 16 rows
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [GROUP_P, BLOCK_D]
    if DOT_FP32:
        q = q.to(tl.float32)

    acc = tl.zeros([GROUP_P, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([GROUP_P], dtype=tl.float32)
    m_i = tl.zeros([GROUP_P], dtype=tl.float32) - 1e30
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr,
                            block_table_ptr + seq * stride_table, kv_head, lo, hi, offs_g,
                            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                            qk_scale, offs_d, d_mask, BLOCK_SIZE, BLOCK_N, False,
                            DOT_PRECISION, DOT_FP32)

    if SINGLE_SPLIT:
        # l_i == 0 only for ctx_len 0, where acc is 0 too: the row gets 0.
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    elif lo < ctx_len:
        # Empty splits write nothing: the combine reads only the splits ctx_len reaches.
        part = (seq.to(tl.int64) * NUM_HEADS + heads) * num_splits + split  # [GROUP_P]
        tl.store(part_l_ptr + part, l_i, mask=g_mask)
        tl.store(part_m_ptr + part, m_i, mask=g_mask)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=g_mask[:, None] & d_mask[None, :])


@_jit
def _combine_splits_kernel(part_acc_ptr, part_l_ptr, part_m_ptr, ctx_lens_ptr, out_ptr,
                           stride_ob, stride_oh, max_ctx_len, partition_size, num_splits,
                           NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                           BLOCK_D: tl.constexpr, SPLIT_TILE: tl.constexpr):
    """Grid (batch, heads): log-sum-exp combine of one row's splits into out [B, H, D].

    Each of SPLIT_TILE lanes folds in every SPLIT_TILE-th split online, then the lanes
    are merged, so any number of splits costs a few vector steps.
    """
    seq = tl.program_id(0)
    head = tl.program_id(1)
    ctx_len = tl.minimum(tl.load(ctx_lens_ptr + seq), max_ctx_len)
    num_valid = (ctx_len + partition_size - 1) // partition_size  # splits with tokens
    base = (seq.to(tl.int64) * NUM_HEADS + head) * num_splits
    offs_s = tl.arange(0, SPLIT_TILE)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    m_lane = tl.zeros([SPLIT_TILE], dtype=tl.float32) - 1e30
    l_lane = tl.zeros([SPLIT_TILE], dtype=tl.float32)
    acc_lane = tl.zeros([SPLIT_TILE, BLOCK_D], dtype=tl.float32)
    for start in range(0, num_valid, SPLIT_TILE):
        idx = start + offs_s
        valid = idx < num_valid
        m_t = tl.load(part_m_ptr + base + idx, mask=valid, other=-1e30)
        l_t = tl.load(part_l_ptr + base + idx, mask=valid, other=0.0)
        acc_t = tl.load(part_acc_ptr + (base + idx)[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=valid[:, None] & d_mask[None, :], other=0.0)
        m_new = tl.maximum(m_lane, m_t)
        alpha = tl.math.exp2(m_lane - m_new)
        beta = tl.math.exp2(m_t - m_new)
        l_lane = l_lane * alpha + l_t * beta
        acc_lane = acc_lane * alpha[:, None] + acc_t * beta[:, None]
        m_lane = m_new

    weights = tl.math.exp2(m_lane - tl.max(m_lane, 0))  # [SPLIT_TILE]
    total = tl.sum(l_lane * weights, 0)
    o = tl.sum(acc_lane * weights[:, None], 0) / tl.where(total > 0, total, 1.0)  # [BLOCK_D]
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d,
             o.to(out_ptr.dtype.element_ty), mask=d_mask)


@_jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, cu_seqlens_q_ptr,
                    ctx_lens_ptr, out_ptr,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                    stride_table, max_ctx_len, qk_scale,
                    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    DOT_FP32: tl.constexpr):
    """Grid (query tiles, seqs, kv_heads): BLOCK_Q query tokens of one sequence, times its
    GQA group, as BLOCK_Q * GROUP_P rows (row r: token r // GROUP_P, head r % GROUP_P)."""
    q_tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    ctx_len = tl.minimum(tl.load(ctx_lens_ptr + seq), max_ctx_len)
    prefix_len = ctx_len - q_len

    offs_m = tl.arange(0, BLOCK_Q * GROUP_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    tok = q_tile * BLOCK_Q + offs_m // GROUP_P  # [M] index within the chunk
    g = offs_m % GROUP_P
    row_mask = (tok < q_len) & (g < GROUP)
    heads = kv_head * GROUP + g
    rows = q_start + tok
    q = tl.load(q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh
                + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    # Positions [0, diag_lo) are before every row of the tile: no causal mask there. The
    # diagonal [diag_lo, hi) ends at the tile's last query. A tile past the chunk (the grid
    # is sized for the longest chunk) reads nothing.
    tile_start = q_tile * BLOCK_Q
    has_rows = tile_start < q_len
    diag_lo = tl.where(has_rows, prefix_len + tile_start, 0)
    hi = tl.where(has_rows, prefix_len + tl.minimum(tile_start + BLOCK_Q, q_len), 0)
    table_row_ptr = block_table_ptr + seq * stride_table
    last_pos = prefix_len + tok  # [M]
    acc = tl.zeros([BLOCK_Q * GROUP_P, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_P], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_Q * GROUP_P], dtype=tl.float32) - 1e30
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, table_row_ptr,
                            kv_head, 0, diag_lo, last_pos,
                            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                            qk_scale, offs_d, d_mask, BLOCK_SIZE, BLOCK_N, False,
                            DOT_PRECISION, DOT_FP32)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, table_row_ptr,
                            kv_head, diag_lo, hi, last_pos,
                            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                            qk_scale, offs_d, d_mask, BLOCK_SIZE, BLOCK_N, True,
                            DOT_PRECISION, DOT_FP32)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh
             + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])


def _check_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                block_table: torch.Tensor, out: torch.Tensor | None) -> None:
    """Shape and layout checks on host metadata only (no device sync)."""
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} "
                         "must both be [num_blocks, block_size, num_kv_heads, head_dim]")
    if q.shape[-1] != k_cache.shape[3] or q.shape[-2] % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit a cache of {k_cache.shape[2]} kv "
                         f"heads of dim {k_cache.shape[3]}")
    if q.stride(-1) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("q and the caches need a contiguous head_dim")
    if block_table.dim() != 2 or block_table.stride(1) != 1:
        raise ValueError("block_table must be [num_seqs, max_blocks] with contiguous rows")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype
                            or out.stride(-1) != 1):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous head_dim")


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 caches: full-precision dots (the default would be tf32); others use tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_fp32(cache: torch.Tensor) -> bool:
    # CPU tensors mean Triton's interpreter, whose tl.dot multiplies bf16 bit patterns
    # (bf16 is unsupported there, triton-lang/triton#11584): give it fp32 operands.
    return cache.device.type == "cpu"


def decode_splits(num_programs: int, table_width: int) -> int:
    """Splits of each sequence's context for ``num_programs`` (batch x kv heads) programs
    over a block table ``table_width`` positions wide: one per PARTITION_SIZE positions,
    but no more than it takes to reach TARGET_DECODE_PROGRAMS programs."""
    return max(1, min(-(-table_width // PARTITION_SIZE),
                      TARGET_DECODE_PROGRAMS // max(num_programs, 1)))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, ctx_lens: torch.Tensor, scale: float,
                           *, out: torch.Tensor | None = None,
                           num_splits: int | None = None) -> torch.Tensor:
    """One query token per sequence over its paged context. Returns [B, H, D] in q's dtype.

    q: [B, H, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_table:
    [B, max_blocks] int32/int64 (entries past a row's blocks are never read); ctx_lens: [B]
    int, positions each query attends to, itself included (0: the row's output is 0).
    num_splits: context splits per sequence; None: ``decode_splits`` of the shapes.
    Either way the grid depends only on shapes, so the call can be captured in a CUDA
    graph. With more than one split the partials take B * H * num_splits * (D + 2) fp32
    of scratch.
    out: [B, H, D] to write into (e.g. a graph's static buffer).
    """
    _require_triton()
    _check_args(q, k_cache, v_cache, block_table, out)
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    max_blocks = block_table.shape[1]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0 or max_blocks == 0:
        return out.zero_()

    if num_splits is None:
        num_splits = decode_splits(batch * num_kv_heads, max_blocks * block_size)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    # A multiple of block_size: the splits cover the whole table.
    partition_size = -(-max_blocks // num_splits) * block_size
    single = num_splits == 1
    if single:  # no partials: the kernel normalizes and writes out itself
        part_acc = part_l = part_m = out
    else:
        part_acc = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32,
                               device=q.device)
        part_l = torch.empty(batch, num_heads, num_splits, dtype=torch.float32,
                             device=q.device)
        part_m = torch.empty_like(part_l)

    block_d = _next_power_of_2(head_dim)
    block_n, num_warps, num_stages = _decode_config(head_dim, batch * num_kv_heads)
    max_ctx_len = max_blocks * block_size
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_table, ctx_lens, out, part_acc, part_l, part_m,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0), max_ctx_len, partition_size, num_splits, scale * _LOG2E,
        NUM_HEADS=num_heads, GROUP=group, GROUP_P=max(16, _next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_N=block_n,
        SINGLE_SPLIT=single, DOT_PRECISION=_dot_precision(k_cache.dtype),
        DOT_FP32=_dot_fp32(k_cache), num_warps=num_warps, num_stages=num_stages)
    if not single:
        _combine_splits_kernel[(batch, num_heads)](
            part_acc, part_l, part_m, ctx_lens, out, out.stride(0), out.stride(1),
            max_ctx_len, partition_size, num_splits,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
            SPLIT_TILE=min(_next_power_of_2(num_splits), _MAX_SPLIT_TILE), num_warps=4)
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_table: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            ctx_lens: torch.Tensor, scale: float, *, max_query_len: int,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of S chunks over their cached prefix plus themselves. Returns
    [T, H, D] in q's dtype.

    q: [T, H, D], sequence s owning rows cu_seqlens_q[s]:cu_seqlens_q[s + 1]
    (cu_seqlens_q: [S + 1] int); ctx_lens: [S] int, prefix + chunk length, so chunk token i
    sits at position ctx_len - query_len + i and sees positions up to its own; all K/V,
    the chunk's included, are read from the cache through block_table [S, max_blocks].
    max_query_len: the longest chunk (a host int: it sizes the grid, no sync). A chunk of
    one token is a decode, so one call can serve a mixed batch.
    """
    _require_triton()
    _check_args(q, k_cache, v_cache, block_table, out)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    num_seqs = cu_seqlens_q.shape[0] - 1
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0 or max_query_len == 0:
        return out

    group_p = _next_power_of_2(group)
    block_m, block_n, num_warps = _prefill_config(head_dim, q.dtype)
    block_q = max(block_m // group_p, 1)  # rows = block_q * group_p >= 16
    grid = (-(-max_query_len // block_q), num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_table, cu_seqlens_q, ctx_lens, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0), block_table.shape[1] * block_size, scale * _LOG2E,
        GROUP=group, GROUP_P=group_p, HEAD_DIM=head_dim, BLOCK_D=_next_power_of_2(head_dim),
        BLOCK_Q=block_q, BLOCK_SIZE=block_size, BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(k_cache.dtype), DOT_FP32=_dot_fp32(k_cache),
        num_warps=num_warps, num_stages=2)
    return out
