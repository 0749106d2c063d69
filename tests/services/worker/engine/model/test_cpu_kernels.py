"""The compiled CPU kernels against plain PyTorch on the same inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.worker.engine.model import cpu_kernels

kernels = cpu_kernels.load()
pytestmark = pytest.mark.skipif(kernels is None, reason="needs an AVX512-BF16 CPU and a compiler")


@pytest.mark.parametrize("rows", [1, 2, 3, 7])
@pytest.mark.parametrize(("n", "k"), [(3072, 576), (577, 1536), (64, 40)])
def test_skinny_linear_matches_f_linear(rows, n, k):
    gen = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    expected = F.linear(x.float(), w.float())
    got = kernels.skinny_linear_bf16(x, w).float()
    # Both accumulate in fp32; the only difference is the final rounding to bf16.
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


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
