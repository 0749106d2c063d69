"""Fused Triton kernels for the small ops of a decoder layer on CUDA: RMSNorm with its
residual add, SiLU-and-multiply, RoPE, and RoPE fused with the KV-cache write.

Why: at decode batch sizes a CUDA step is launch-bound, not bandwidth- or compute-bound.
The plain PyTorch ops (``ops.TORCH_OPS``) spend several kernels on each of these (cast,
square, mean, rsqrt, multiply, cast, multiply for one RMSNorm; a cat and four
elementwise kernels for RoPE; two ``index_copy_`` for the cache write), and each of
those kernels reads and writes the activations through HBM once more. Here each op is
one launch, and the rotated keys go straight into the cache.

Each op is a drop-in for the ``LayerOps`` field of the same name and rounds where the
torch op rounds (fp32 math, a cast to the activation dtype after each torch op), so
results differ from ``TORCH_OPS`` only where fp32 sums or exp are ordered differently
(one bf16 step at most). Every op is safe to
capture in a CUDA graph: no host syncs, no branching on tensor values, outputs
allocated with ``torch.empty`` or written in place, grids from shapes only. A cache
slot of -1 marks a padding token (the padded rows of a captured batch) whose K/V are
not written.

Importing this module needs no Triton (``HAS_TRITON`` says whether the ops can run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from services.worker.engine.model.ops import LayerOps

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the module imports, the ops cannot run
    HAS_TRITON = False
else:
    HAS_TRITON = True

Tensor = torch.Tensor
MAX_TILE = 1024  # elements per head tile of the RoPE / KV kernels (keeps registers low)
SILU_BLOCK = 1024  # columns per program of silu_mul


def _jit(fn: Callable[..., Any]) -> Any:
    return triton.jit(fn) if HAS_TRITON else fn


def _num_warps(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


# --- kernels -----------------------------------------------------------------------------

@_jit
def _add_rms_norm_kernel(x_ptr, delta_ptr, w_ptr, h_ptr, x_row_stride, delta_row_stride,
                         h_row_stride, n_cols, eps,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    # One row per program: x[row] (+= delta[row]), h[row] = w * rms_norm(x[row]).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_ptrs = x_ptr + row * x_row_stride + cols
    x = tl.load(x_ptrs, mask=mask, other=0.0)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + row * delta_row_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(x_ptrs, x, mask=mask)
    # As ops.rms_norm: normalize in fp32, round to x's dtype, then multiply by the weight.
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + row * h_row_stride + cols, (w * normed).to(h_ptr.dtype.element_ty),
             mask=mask)


@_jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, gate_up_row_stride, out_row_stride, n_cols,
                     BLOCK: tl.constexpr):
    # Program (row, column block): out[row, c] = silu(gate_up[row, c]) * gate_up[row, I + c].
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate_ptrs = gate_up_ptr + row * gate_up_row_stride + cols
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + n_cols, mask=mask, other=0.0).to(tl.float32)
    # As F.silu then `*`: silu in fp32 rounded to the dtype, the product rounded again.
    silu = (gate / (1.0 + tl.exp(-gate))).to(gate_up_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (silu * up).to(out_ptr.dtype.element_ty),
             mask=mask)


@_jit
def _rotate(x_ptr, cos_ptr, sin_ptr, first_head, num_heads, head_dim,
            BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Heads [first_head, first_head + BLOCK_H) of one token's run of contiguous heads
    at x_ptr, rotated. Returns both halves [BLOCK_H, BLOCK_HALF], their offsets from
    x_ptr (the second half is at offsets + half) and the mask of real elements."""
    half = head_dim // 2
    heads = first_head + tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    col_mask = cols < half
    mask = (heads < num_heads) & col_mask
    offsets = heads * head_dim + cols
    x1 = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + offsets + half, mask=mask, other=0.0).to(tl.float32)
    cos1 = tl.load(cos_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + half + cols, mask=col_mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + half + cols, mask=col_mask, other=0.0).to(tl.float32)
    # As ops.rope, x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1], each
    # product and the sum rounded to the dtype.
    dt = x_ptr.dtype.element_ty
    out1 = ((x1 * cos1).to(dt).to(tl.float32) + (-x2 * sin1).to(dt).to(tl.float32)).to(dt)
    out2 = ((x2 * cos2).to(dt).to(tl.float32) + (x1 * sin2).to(dt).to(tl.float32)).to(dt)
    return out1, out2, offsets, mask


@_jit
def _rope_kernel(qkv_ptr, cos_ptr, sin_ptr, qkv_row_stride, cos_row_stride, sin_row_stride,
                 num_heads, head_dim, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # Program (token, head block): rotate BLOCK_H of the token's first num_heads heads.
    t = tl.program_id(0).to(tl.int64)
    row_ptr = qkv_ptr + t * qkv_row_stride
    out1, out2, offsets, mask = _rotate(row_ptr, cos_ptr + t * cos_row_stride,
                                        sin_ptr + t * sin_row_stride,
                                        tl.program_id(1) * BLOCK_H, num_heads, head_dim,
                                        BLOCK_H, BLOCK_HALF)
    tl.store(row_ptr + offsets, out1, mask=mask)
    tl.store(row_ptr + offsets + head_dim // 2, out2, mask=mask)


@_jit
def _store_to_slot(cache_ptr, slot, block_size, block_stride, slot_stride, head_stride,
                   heads, cols, values, mask):
    # slot = block * block_size + offset; slot -1 (padding) writes nothing.
    block = slot // block_size
    offset = slot % block_size
    ptrs = cache_ptr + block * block_stride + offset * slot_stride + heads * head_stride + cols
    # The slot test is broadcast to a tensor before the `&`: TRITON_INTERPRET turns a
    # tensor-and-scalar mask into int32, which tl.store rejects.
    tl.store(ptrs, values, mask=mask & (heads * 0 + slot >= 0))


@_jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     k_row_stride, k_head_stride, v_row_stride, v_head_stride,
                     block_size, k_block_stride, k_slot_stride, k_cache_head_stride,
                     v_block_stride, v_slot_stride, v_cache_head_stride,
                     num_kv_heads, head_dim, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (token, head block): copy BLOCK_H heads of k and v into the token's slot.
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_kv_heads) & (cols < head_dim)
    k = tl.load(k_ptr + t * k_row_stride + heads * k_head_stride + cols, mask=mask)
    v = tl.load(v_ptr + t * v_row_stride + heads * v_head_stride + cols, mask=mask)
    _store_to_slot(k_cache_ptr, slot, block_size, k_block_stride, k_slot_stride,
                   k_cache_head_stride, heads, cols, k, mask)
    _store_to_slot(v_cache_ptr, slot, block_size, v_block_stride, v_slot_stride,
                   v_cache_head_stride, heads, cols, v, mask)


@_jit
def _rope_write_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                          qkv_row_stride, cos_row_stride, sin_row_stride,
                          block_size, k_block_stride, k_slot_stride, k_cache_head_stride,
                          v_block_stride, v_slot_stride, v_cache_head_stride,
                          num_heads, num_kv_heads, head_dim, num_q_programs,
                          BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # Program (token, j): j < num_q_programs rotates a block of q heads in place; the
    # rest each rotate a block of k heads (in place too) and store it, with the same v
    # heads, into the token's cache slot.
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    row_ptr = qkv_ptr + t * qkv_row_stride
    cos_row = cos_ptr + t * cos_row_stride
    sin_row = sin_ptr + t * sin_row_stride
    half = head_dim // 2
    if j < num_q_programs:
        out1, out2, offsets, mask = _rotate(row_ptr, cos_row, sin_row, j * BLOCK_H, num_heads,
                                            head_dim, BLOCK_H, BLOCK_HALF)
        tl.store(row_ptr + offsets, out1, mask=mask)
        tl.store(row_ptr + offsets + half, out2, mask=mask)
    else:
        first = (j - num_q_programs) * BLOCK_H
        k_ptr = row_ptr + num_heads * head_dim
        k1, k2, offsets, mask = _rotate(k_ptr, cos_row, sin_row, first, num_kv_heads,
                                        head_dim, BLOCK_H, BLOCK_HALF)
        tl.store(k_ptr + offsets, k1, mask=mask)
        tl.store(k_ptr + offsets + half, k2, mask=mask)
        v_ptr = k_ptr + num_kv_heads * head_dim
        v1 = tl.load(v_ptr + offsets, mask=mask)
        v2 = tl.load(v_ptr + offsets + half, mask=mask)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        heads = first + tl.arange(0, BLOCK_H)[:, None]
        cols = tl.arange(0, BLOCK_HALF)[None, :]
        _store_to_slot(k_cache_ptr, slot, block_size, k_block_stride, k_slot_stride,
                       k_cache_head_stride, heads, cols, k1, mask)
        _store_to_slot(k_cache_ptr, slot, block_size, k_block_stride, k_slot_stride,
                       k_cache_head_stride, heads, cols + half, k2, mask)
        _store_to_slot(v_cache_ptr, slot, block_size, v_block_stride, v_slot_stride,
                       v_cache_head_stride, heads, cols, v1, mask)
        _store_to_slot(v_cache_ptr, slot, block_size, v_block_stride, v_slot_stride,
                       v_cache_head_stride, heads, cols + half, v2, mask)


# --- ops ---------------------------------------------------------------------------------

def _check_rows(*tensors: Tensor) -> None:
    for t in tensors:
        assert t.dim() == 2 and t.stride(1) == 1, "expected [rows, cols] with unit column stride"


def _launch_norm(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> Tensor:
    _check_rows(x, x if delta is None else delta)
    assert weight.is_contiguous() and weight.shape == x.shape[1:]
    h = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    num_rows, n_cols = x.shape
    if num_rows == 0:
        return h
    block = triton.next_power_of_2(n_cols)
    _add_rms_norm_kernel[(num_rows,)](
        x, x if delta is None else delta, weight, h, x.stride(0),
        0 if delta is None else delta.stride(0), h.stride(0), n_cols, eps,
        HAS_DELTA=delta is not None, BLOCK=block, num_warps=_num_warps(block))
    return h


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [T, d], weight [d] -> weight * rms_norm(x) [T, d], with ops.rms_norm's rounding."""
    return _launch_norm(x, None, weight, eps)


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x += delta in place (in x's dtype); returns (x, rms_norm(x, weight, eps))."""
    return x, _launch_norm(x, delta, weight, eps)


def silu_mul(gate_up: Tensor) -> Tensor:
    """gate_up [T, 2I] -> silu(gate) * up [T, I], with ops.silu_mul's rounding."""
    _check_rows(gate_up)
    assert gate_up.shape[1] % 2 == 0
    num_rows, n_cols = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(num_rows, n_cols, dtype=gate_up.dtype, device=gate_up.device)
    if num_rows == 0:
        return out
    block = min(triton.next_power_of_2(n_cols), SILU_BLOCK)
    _silu_mul_kernel[(num_rows, triton.cdiv(n_cols, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), n_cols, BLOCK=block)
    return out


def _head_tiling(max_heads: int, head_cols: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_cols): heads per program and the padded columns per head."""
    block_cols = triton.next_power_of_2(head_cols)
    block_h = min(triton.next_power_of_2(max_heads), max(1, MAX_TILE // block_cols))
    return block_h, block_cols


def _check_rope_inputs(qkv: Tensor, cos: Tensor, sin: Tensor, head_dim: int) -> None:
    _check_rows(qkv, cos, sin)
    assert head_dim % 2 == 0 and cos.shape[1] == sin.shape[1] == head_dim
    assert cos.dtype == sin.dtype == qkv.dtype, "cos/sin must be in the activations' dtype"


def rope(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, head_dim: int) -> Tensor:
    """Rotates the first num_heads heads of each row of qkv [T, *] in place (neox
    rotate_half, cos/sin [T, D] with duplicated halves); returns them, [T, num_heads, D]."""
    _check_rope_inputs(qkv, cos, sin, head_dim)
    num_tokens = qkv.shape[0]
    if num_tokens > 0:
        block_h, block_half = _head_tiling(num_heads, head_dim // 2)
        _rope_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
            qkv, cos, sin, qkv.stride(0), cos.stride(0), sin.stride(0), num_heads, head_dim,
            BLOCK_H=block_h, BLOCK_HALF=block_half)
    return qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)


def _cache_args(k_cache: Tensor, v_cache: Tensor) -> tuple[int, ...]:
    """block_size and the block/slot/head strides of both caches [N, block_size, Hkv, D]."""
    assert k_cache.shape == v_cache.shape and k_cache.stride(3) == v_cache.stride(3) == 1
    return (k_cache.shape[1], *k_cache.stride()[:3], *v_cache.stride()[:3])


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
             slot_mapping: Tensor) -> None:
    """Stores k, v [T, Hkv, D] (unit stride in D) into the caches [N, block_size, Hkv, D]
    at flat slot slot_mapping[t] = block * block_size + offset; slot -1 stores nothing."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape and k.stride(2) == v.stride(2) == 1
    assert k_cache.shape[2:] == (num_kv_heads, head_dim) and slot_mapping.shape == (num_tokens,)
    if num_tokens == 0:
        return
    block_h, block_d = _head_tiling(num_kv_heads, head_dim)
    _write_kv_kernel[(num_tokens, triton.cdiv(num_kv_heads, block_h))](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *_cache_args(k_cache, v_cache), num_kv_heads, head_dim,
        BLOCK_H=block_h, BLOCK_D=block_d)


def rope_write_kv(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                  slot_mapping: Tensor, num_heads: int, num_kv_heads: int,
                  head_dim: int) -> Tensor:
    """ops.rope over the q and k heads then write_kv, in one launch.

    qkv [T, (H + 2 Hkv) * D]: the q and k heads are rotated in place (so qkv's k view is
    the rotated keys, as prefill attention reads them); the rotated k and the v heads
    go to the caches at slot_mapping[t] (-1: nothing stored). Returns q, [T, H, D]."""
    _check_rope_inputs(qkv, cos, sin, head_dim)
    num_tokens = qkv.shape[0]
    assert qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim
    assert k_cache.shape[2:] == (num_kv_heads, head_dim) and slot_mapping.shape == (num_tokens,)
    if num_tokens > 0:
        block_h, block_half = _head_tiling(max(num_heads, num_kv_heads), head_dim // 2)
        num_q_programs = triton.cdiv(num_heads, block_h)
        num_programs = num_q_programs + triton.cdiv(num_kv_heads, block_h)
        _rope_write_kv_kernel[(num_tokens, num_programs)](
            qkv, cos, sin, k_cache, v_cache, slot_mapping,
            qkv.stride(0), cos.stride(0), sin.stride(0), *_cache_args(k_cache, v_cache),
            num_heads, num_kv_heads, head_dim, num_q_programs,
            BLOCK_H=block_h, BLOCK_HALF=block_half)
    return qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)


def make_layer_ops(base: LayerOps) -> LayerOps:
    """base with its norm, activation, RoPE and KV-write ops replaced by these kernels."""
    assert HAS_TRITON, "the Triton ops need the triton package"
    return dataclasses.replace(base, rms_norm=rms_norm, add_rms_norm=add_rms_norm,
                               silu_mul=silu_mul, rope=rope, write_kv=write_kv,
                               rope_write_kv=rope_write_kv)
