"""The compiled CPU kernels against plain PyTorch on the same inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.worker.engine.model import cpu_kernels

kernels = cpu_kernels.load()
pytestmark = pytest.mark.skipif(kernels is None, reason="needs an AVX512-BF16 CPU and a compiler")


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 9])
@pytest.mark.parametrize(("n", "k"), [(3072, 576), (577, 1536), (64, 40)])
def test_skinny_linear_matches_f_linear(rows, n, k):
    gen = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    expected = F.linear(x.float(), w.float())
    got = kernels.skinny_linear_bf16(x, w).float()
    # Both accumulate in fp32; the only difference is the final rounding to bf16.
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


@pytest.mark.parametrize("rows", [2, 5, 9, 13])
@pytest.mark.parametrize(("n", "k"), [(3072, 576), (577, 1536)])
def test_skinny_linear_gives_each_row_what_a_one_row_call_gives(rows, n, k):
    # Bit for bit: speculative verification must see the logits plain decoding sees.
    gen = torch.Generator().manual_seed(rows + n)
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    many = kernels.skinny_linear_bf16(x, w)
    for i in range(rows):
        assert torch.equal(many[i:i + 1], kernels.skinny_linear_bf16(x[i:i + 1], w)), i


def test_paged_decode_attention_matches_sdpa_over_gathered_blocks():
    gen = torch.Generator().manual_seed(0)
    num_blocks, bs, hkv, group, d = 40, 16, 3, 3, 64
    k_cache = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(torch.bfloat16)
    ctx_lens = [1, 17, 40, 100]
    tables = [torch.randperm(num_blocks, generator=gen)[: -(-n // bs)].tolist()
              for n in ctx_lens]
    width = max(map(len, tables))
    block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(len(ctx_lens), hkv * group, d, generator=gen).to(torch.bfloat16)
    scale = d ** -0.5
    got = kernels.paged_decode_attention_bf16(q, k_cache, v_cache, block_table,
                                              torch.tensor(ctx_lens), scale)
    for b, n in enumerate(ctx_lens):
        keys = k_cache[tables[b]].reshape(-1, hkv, d)[:n].float().transpose(0, 1)  # [Hkv, n, D]
        values = v_cache[tables[b]].reshape(-1, hkv, d)[:n].float().transpose(0, 1)
        query = q[b].float().view(hkv, group, d)
        expected = F.scaled_dot_product_attention(query, keys, values, scale=scale)
        torch.testing.assert_close(got[b].float().view(hkv, group, d), expected,
                                   rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("hkv", [1, 3, 8])
def test_single_sequence_attention_split_across_kv_heads_equals_one_thread(hkv):
    # Fewer sequences than threads: each sequence's KV heads go to different threads.
    # A head's arithmetic must not depend on that (greedy output may not vary with the
    # thread count), so it equals the one-thread result bit for bit.
    gen = torch.Generator().manual_seed(hkv)
    num_blocks, bs, group, d = 24, 16, 3, 64
    k_cache = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(torch.bfloat16)
    block_table = torch.randperm(num_blocks, generator=gen)[:20].view(1, -1)
    q = torch.randn(1, hkv * group, d, generator=gen).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(kernels.paged_decode_attention_bf16(
                q, k_cache, v_cache, block_table, torch.tensor([300]), d ** -0.5))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def _bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    # bf16 keeps 8 bits of mantissa: one rounding step is ~0.4% of the value.
    torch.testing.assert_close(got.float(), expected.float(), rtol=1.6e-2, atol=1.6e-2)


def test_fused_rms_norm_and_add_rms_norm_match_torch_ops():
    from services.worker.engine.model import ops

    x, w, delta = _bf16(5, 576, seed=1), _bf16(576, seed=2), _bf16(5, 576, seed=3)
    _close(kernels.rms_norm_bf16(x, w, 1e-5), ops.rms_norm(x, w, 1e-5))
    expected_x, expected_h = ops.add_rms_norm(x, delta, w, 1e-5)
    x_inplace = x.clone()
    got_h = kernels.add_rms_norm_bf16(x_inplace, delta, w, 1e-5)
    _close(x_inplace, expected_x)
    _close(got_h, expected_h)


def test_fused_rope_rotates_q_and_k_heads_in_place_and_leaves_v():
    from services.worker.engine.model import ops
    from services.worker.engine.model.config import PRESETS
    from services.worker.engine.model.llama import RotaryTable

    cfg = PRESETS["smollm2-135m"]
    table = RotaryTable(cfg, 64, device=torch.device("cpu"), dtype=torch.bfloat16)
    cos, sin = table.lookup(torch.tensor([0, 3, 17, 63]))
    qkv = _bf16(4, (9 + 2 * 3) * 64, seed=4)
    expected = ops.rope(qkv, cos, sin, 12, 64)
    got = qkv.clone()
    kernels.rope_bf16_(got, cos, sin, 12, 64)
    _close(got[:, : 12 * 64].view(4, 12, 64), expected)
    assert torch.equal(got[:, 12 * 64:], qkv[:, 12 * 64:])


def test_fused_silu_mul_matches_torch_ops():
    from services.worker.engine.model import ops

    gate_up = _bf16(3, 2 * 1536, seed=5)
    _close(kernels.silu_mul_bf16(gate_up), ops.silu_mul(gate_up))


def test_write_kv_stores_strided_rows_into_their_slots():
    from services.worker.engine.model.attention import write_kv

    qkv = _bf16(5, (9 + 2 * 3) * 64, seed=6)
    k = qkv[:, 9 * 64: 12 * 64].view(5, 3, 64)
    v = qkv[:, 12 * 64:].view(5, 3, 64)
    slots = torch.tensor([7, 0, 33, 34, 12])
    caches = [torch.zeros(4, 16, 3, 64, dtype=torch.bfloat16) for _ in range(4)]
    kernels.write_kv_bf16(k, v, caches[0], caches[1], slots)
    write_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert torch.equal(caches[0].view(-1, 3, 64)[33], k[2])
