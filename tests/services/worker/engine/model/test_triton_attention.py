"""The Triton paged-attention kernels against SDPA over gathered blocks, in fp32.

Runs under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors), so sizes stay small
except the few long-context cases.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run kernels on the CPU

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from services.worker.engine.model import triton_attention
from services.worker.engine.model.triton_attention import (
    paged_decode_attention,
    paged_prefill_attention,
)

BLOCK_SIZE = 16
# Table entries past a row's blocks: far outside the cache, so reading one would fail.
PAD_BLOCK_ID = 1 << 20


def _caches(num_blocks: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
            *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    return (torch.randn(*shape, generator=gen).to(dtype),
            torch.randn(*shape, generator=gen).to(dtype))


def _block_tables(ctx_lens: list[int], num_blocks: int, *, seed: int,
                  dtype: torch.dtype = torch.int64) -> tuple[list[list[int]], torch.Tensor]:
    """Each sequence gets distinct shuffled (non-contiguous) block ids; rows are padded."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in ctx_lens:
        count = -(-n // BLOCK_SIZE)
        tables.append(ids[used: used + count])
        used += count
    assert used <= num_blocks
    width = max(1, *map(len, tables))
    padded = [t + [PAD_BLOCK_ID] * (width - len(t)) for t in tables]
    return tables, torch.tensor(padded, dtype=dtype)


def _reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               block_ids: list[int], ctx_len: int) -> torch.Tensor:
    """q: [n, H, D], the last n positions of a ctx_len context. Returns [n, H, D] fp32."""
    n, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    # [ctx_len, Hkv, D] -> [H, ctx_len, D]: query head h reads kv head h // group.
    keys = k_cache[block_ids].reshape(-1, num_kv_heads, head_dim)[:ctx_len].float()
    values = v_cache[block_ids].reshape(-1, num_kv_heads, head_dim)[:ctx_len].float()
    keys = keys.transpose(0, 1).repeat_interleave(group, dim=0)
    values = values.transpose(0, 1).repeat_interleave(group, dim=0)
    positions = torch.arange(ctx_len - n, ctx_len)
    mask = positions[:, None] >= torch.arange(ctx_len)[None, :]  # [n, ctx_len] causal
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1), keys, values,
                                         attn_mask=mask, scale=head_dim ** -0.5)
    return out.transpose(0, 1)


def _assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    else:  # bf16 inputs and output: a few roundings of ~0.4% each
        torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


def _check_decode(got: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, tables: list[list[int]], ctx_lens: list[int]) -> None:
    assert got.shape == q.shape and got.dtype == q.dtype
    for b, n in enumerate(ctx_lens):
        if n == 0:
            assert torch.equal(got[b], torch.zeros_like(got[b]))
            continue
        _assert_close(got[b: b + 1], _reference(q[b: b + 1], k_cache, v_cache, tables[b], n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"),
                         [(9, 3, 64), (32, 8, 128), (4, 2, 80)])
def test_decode_matches_reference_at_block_boundaries(dtype, num_heads, num_kv_heads,
                                                      head_dim):
    ctx_lens = [1, 15, 16, 17, 32, 33, 0]  # the last row is CUDA-graph padding
    k_cache, v_cache = _caches(24, num_kv_heads, head_dim, dtype, seed=1)
    tables, block_table = _block_tables(ctx_lens, 24, seed=2)
    q = torch.randn(len(ctx_lens), num_heads, head_dim,
                    generator=torch.Generator().manual_seed(3)).to(dtype)
    got = paged_decode_attention(q, k_cache, v_cache, block_table, torch.tensor(ctx_lens),
                                 head_dim ** -0.5)
    _check_decode(got, q, k_cache, v_cache, tables, ctx_lens)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_split_k_matches_one_split_and_reference(num_splits):
    # 8 splits of 2 blocks over 13-block rows: the shorter rows leave splits empty.
    ctx_lens = [200, 37, 129, 1]
    k_cache, v_cache = _caches(40, 2, 64, torch.float32, seed=4)
    tables, block_table = _block_tables(ctx_lens, 40, seed=5, dtype=torch.int32)
    q = torch.randn(4, 6, 64, generator=torch.Generator().manual_seed(6))
    args = (q, k_cache, v_cache, block_table, torch.tensor(ctx_lens, dtype=torch.int32),
            64 ** -0.5)
    got = paged_decode_attention(*args, num_splits=num_splits)
    _check_decode(got, q, k_cache, v_cache, tables, ctx_lens)
    torch.testing.assert_close(got, paged_decode_attention(*args, num_splits=1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_4k_context_splits_by_partition(dtype):
    ctx_lens = [4096, 2500]
    k_cache, v_cache = _caches(256 + 157, 1, 64, dtype, seed=7)
    tables, block_table = _block_tables(ctx_lens, 256 + 157, seed=8)
    q = torch.randn(2, 2, 64, generator=torch.Generator().manual_seed(9)).to(dtype)
    # num_splits None: one per PARTITION_SIZE positions of the 4096-wide table (2
    # programs are far from the GPU's fill target).
    assert 4096 // triton_attention.PARTITION_SIZE > 1
    got = paged_decode_attention(q, k_cache, v_cache, block_table, torch.tensor(ctx_lens),
                                 64 ** -0.5)
    _check_decode(got, q, k_cache, v_cache, tables, ctx_lens)


def test_decode_fixed_grid_for_cuda_graphs_writes_padding_rows_as_zeros():
    # A graph captured for max_model_len 2048: a 128-block-wide table, so 4 splits
    # whatever the lengths (most of them empty here). Padding rows (ctx_len 0) have
    # garbage tables.
    ctx_lens = [40, 0, 3, 0]
    k_cache, v_cache = _caches(8, 2, 64, torch.bfloat16, seed=10)
    tables, narrow = _block_tables(ctx_lens, 8, seed=11)
    block_table = torch.full((4, 128), PAD_BLOCK_ID, dtype=torch.int64)
    block_table[:, : narrow.shape[1]] = narrow
    # q is a strided view of a fused qkv row, as the model produces it.
    qkv = torch.randn(4, (4 + 2 * 2) * 64, generator=torch.Generator().manual_seed(12))
    q = qkv.to(torch.bfloat16)[:, : 4 * 64].view(4, 4, 64)
    out = torch.full((4, 4, 64), float("nan"), dtype=torch.bfloat16)
    assert 2048 // triton_attention.PARTITION_SIZE == 4
    got = paged_decode_attention(q, k_cache, v_cache, block_table, torch.tensor(ctx_lens),
                                 64 ** -0.5, out=out)
    assert got is out
    _check_decode(got, q, k_cache, v_cache, tables, ctx_lens)


def _run_prefill(chunks: list[tuple[int, int]], num_heads: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, *, seed: int,
                 index_dtype: torch.dtype = torch.int64) -> None:
    """chunks: (prefix_len, query_len) per sequence; checks every query row."""
    ctx_lens = [prefix + n for prefix, n in chunks]
    num_blocks = sum(-(-n // BLOCK_SIZE) for n in ctx_lens) + 3
    k_cache, v_cache = _caches(num_blocks, num_kv_heads, head_dim, dtype, seed=seed)
    tables, block_table = _block_tables(ctx_lens, num_blocks, seed=seed + 1,
                                        dtype=index_dtype)
    query_lens = [n for _, n in chunks]
    cu_seqlens_q = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()],
                                dtype=index_dtype)
    q = torch.randn(sum(query_lens), num_heads, head_dim,
                    generator=torch.Generator().manual_seed(seed + 2)).to(dtype)
    got = paged_prefill_attention(q, k_cache, v_cache, block_table, cu_seqlens_q,
                                  torch.tensor(ctx_lens, dtype=index_dtype), head_dim ** -0.5,
                                  max_query_len=max(query_lens))
    assert got.shape == q.shape and got.dtype == dtype
    for s, (start, end) in enumerate(zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(),
                                         strict=True)):
        _assert_close(got[start:end],
                      _reference(q[start:end], k_cache, v_cache, tables[s], ctx_lens[s]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prefill_fresh_chunk_is_causal(dtype):
    _run_prefill([(0, 40)], 9, 3, 64, dtype, seed=20)


@pytest.mark.parametrize("chunks", [
    [(21, 30)],  # a prefix that ends mid-block
    [(37, 1)],  # a chunk of one token
    [(100, 70)],  # several query tiles over a long prefix
])
def test_prefill_over_a_cached_prefix(chunks):
    _run_prefill(chunks, 4, 2, 80, torch.float32, seed=30)


def test_prefill_last_chunk_of_a_4k_context():
    _run_prefill([(4000, 96)], 2, 1, 64, torch.bfloat16, seed=35, index_dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_mixed_batch_with_decodes(dtype):
    chunks = [(0, 33), (16, 1), (21, 17), (99, 1), (0, 1), (5, 16)]
    _run_prefill(chunks, 32, 8, 128, dtype, seed=40)


def test_prefill_of_one_token_chunks_equals_decode():
    ctx_lens = [1, 17, 64, 90]
    k_cache, v_cache = _caches(16, 3, 64, torch.bfloat16, seed=50)
    _, block_table = _block_tables(ctx_lens, 16, seed=51)
    q = torch.randn(4, 9, 64, generator=torch.Generator().manual_seed(52)).to(torch.bfloat16)
    lens = torch.tensor(ctx_lens)
    decode = paged_decode_attention(q, k_cache, v_cache, block_table, lens, 0.125)
    prefill = paged_prefill_attention(q, k_cache, v_cache, block_table, torch.arange(5), lens,
                                      0.125, max_query_len=1)
    torch.testing.assert_close(prefill, decode, rtol=1e-2, atol=1e-2)


def test_functions_raise_a_clear_error_without_triton(monkeypatch):
    monkeypatch.setattr(triton_attention, "HAS_TRITON", False)
    q = torch.zeros(1, 2, 64)
    k_cache, v_cache = _caches(1, 1, 64, torch.float32, seed=60)
    with pytest.raises(RuntimeError, match="needs triton"):
        paged_decode_attention(q, k_cache, v_cache, torch.zeros(1, 1, dtype=torch.int64),
                               torch.ones(1, dtype=torch.int64), 0.125)
