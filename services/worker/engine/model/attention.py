"""Attention over the paged KV cache, with torch SDPA.

The cache of one layer is two tensors ``[num_blocks, block_size, num_kv_heads, head_dim]``.
A step's tokens are one flat batch: decodes first (one query each), then prefill
chunks. New keys/values are written to their slots first (``write_kv``); then

- decodes go to a compiled kernel that reads the blocks in place (bf16 on AVX512-BF16
  CPUs), or else are grouped by context length (to bound padding) and each group
  gathers its blocks into a padded ``[B, kv_heads, L, D]`` view for one SDPA call, with
  the query heads that share a KV head laid out as extra query rows (no KV repeat);
- each prefill chunk runs one causal SDPA call, over its own fresh K/V when it starts
  at position 0, else over its gathered prefix plus chunk with an offset causal mask;
  or, with a varlen prefill kernel (Triton on CUDA), all chunks go to one call that
  reads prefix and chunk from the cache in place (``PrefillBatch``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# A compiled decode-attention kernel: (q [B, H, D], k_cache, v_cache, block_table,
# ctx_lens, scale) -> [B, H, D]; reads the paged cache directly.
DecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                         float], torch.Tensor]

# A varlen causal prefill kernel: (q [T, H, D], k_cache, v_cache, block_table [S, W],
# cu_seqlens_q [S + 1], ctx_lens [S], scale, max_query_len) -> [T, H, D]; the chunks'
# own K/V are already in the cache.
PrefillKernel = Callable[..., torch.Tensor]


@dataclass(slots=True)
class DecodeGroup:
    token_slice: slice  # rows of the flat batch
    block_table: torch.Tensor  # [B, max_blocks] int64, padded with 0
    ctx_lens: torch.Tensor  # [B] int64: tokens each query attends to (itself included)
    mask: torch.Tensor | None  # [B, 1, 1, max_blocks * block_size] bool; None with a kernel


@dataclass(slots=True)
class PrefillChunk:
    token_slice: slice  # rows of the flat batch
    start: int  # position of the chunk's first token
    block_ids: torch.Tensor | None  # [num_blocks] int64 covering start + len; None if start == 0
    mask: torch.Tensor | None  # [q_len, start + q_len] bool when start > 0


@dataclass(slots=True)
class PrefillBatch:
    """Every prefill chunk of a step, for one varlen kernel call."""

    token_slice: slice  # rows of the flat batch holding all the chunks, back to back
    block_table: torch.Tensor  # [S, max_blocks] int64, padded with 0
    cu_seqlens_q: torch.Tensor  # [S + 1] int64: chunk s is rows [cu[s], cu[s+1]) of the slice
    ctx_lens: torch.Tensor  # [S] int64: cached prefix + chunk length
    max_query_len: int  # the longest chunk (sizes the kernel's grid; a host int)


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) per token
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillChunk]  # one SDPA call each (no varlen kernel)
    prefill_batch: PrefillBatch | None = None  # with a varlen kernel, instead of prefills
    # Speculative verification: each row must compute what a one-token decode at its
    # position computes, so that greedy output matches plain decoding token for token
    # (the model takes its row-by-row decode kernels where it has them).
    row_exact: bool = False

    @property
    def has_prefills(self) -> bool:
        return bool(self.prefills) or self.prefill_batch is not None


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the step's keys/values. k, v: [T, kv_heads, D]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """[..., n] block ids -> [..., kv_heads, n * block_size, D]."""
    num_blocks, bs, h, d = cache.shape
    # index_select copies whole blocks (rows of bs*h*d) and is ~3x faster than
    # advanced indexing here.
    x = cache.view(num_blocks, -1).index_select(0, block_ids.reshape(-1))
    return x.view(*block_ids.shape[:-1], block_ids.shape[-1] * bs, h, d).transpose(-3, -2)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, *, scale: float,
                    decode_kernel: DecodeKernel | None = None,
                    prefill_kernel: PrefillKernel | None = None) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D] (this step's, already written to the cache).
    Returns [T, H, D]."""
    num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    group = num_heads // num_kv_heads
    if decode_kernel is not None and not meta.has_prefills and len(meta.decode_groups) == 1:
        g = meta.decode_groups[0]  # a pure decode step: the kernel's output is the answer
        return decode_kernel(q, k_cache, v_cache, g.block_table, g.ctx_lens, scale)
    out = torch.empty_like(q)

    for g in meta.decode_groups:
        if decode_kernel is not None:
            out[g.token_slice] = decode_kernel(q[g.token_slice], k_cache, v_cache,
                                               g.block_table, g.ctx_lens, scale)
            continue
        # Query heads h = kv * group + j share KV head kv: view them as `group` query rows.
        qg = q[g.token_slice].view(-1, num_kv_heads, group, head_dim)  # [B, Hkv, group, D]
        kg = _gather(k_cache, g.block_table)  # [B, Hkv, L, D]
        vg = _gather(v_cache, g.block_table)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=scale)
        out[g.token_slice] = o.reshape(-1, num_heads, head_dim)

    for p in meta.prefills:
        qp = q[p.token_slice].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if p.block_ids is None:
            kp = k[p.token_slice].transpose(0, 1).unsqueeze(0)  # [1, Hkv, n, D]
            vp = v[p.token_slice].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale,
                                               enable_gqa=group > 1)
        else:
            n = qp.shape[2]
            ctx = p.start + n
            kp = _gather(k_cache, p.block_ids)[:, :ctx].unsqueeze(0)  # [1, Hkv, ctx, D]
            vp = _gather(v_cache, p.block_ids)[:, :ctx].unsqueeze(0)
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, scale=scale,
                                               enable_gqa=group > 1)
        out[p.token_slice] = o.squeeze(0).transpose(0, 1)

    b = meta.prefill_batch
    if b is not None:
        if prefill_kernel is None:
            raise ValueError("a PrefillBatch needs a varlen prefill kernel")
        out[b.token_slice] = prefill_kernel(q[b.token_slice], k_cache, v_cache, b.block_table,
                                            b.cu_seqlens_q, b.ctx_lens, scale,
                                            max_query_len=b.max_query_len)
    return out
