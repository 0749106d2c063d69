"""The CPU op set's batched linear: oneDNN on packed weights at bucketed row counts."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from services.worker.engine.model import cpu_kernels
from services.worker.engine.model.ops import padded_rows, pick_ops
from services.worker.engine.model.quant import quantize_int4


def test_row_counts_are_bucketed_to_few_shapes():
    assert [padded_rows(n) for n in (3, 8, 9, 63, 64, 65, 96, 97, 512)] == [
        8, 8, 16, 64, 64, 96, 96, 128, 512]
    assert len({padded_rows(n) for n in range(3, 513)}) == 22


@pytest.mark.skipif(cpu_kernels.load() is None, reason="needs an AVX512-BF16 CPU")
@pytest.mark.parametrize("rows", [3, 9, 64, 65, 200])
def test_padded_calls_give_back_the_real_rows_of_the_product(rows):
    gen = torch.Generator().manual_seed(rows)
    w = (torch.randn(96, 128, generator=gen) * 0.1).to(torch.bfloat16)
    q = replace(quantize_int4(torch.randn(64, 128, generator=gen) * 0.1, 32),
                dtype=torch.bfloat16)
    ops = pick_ops(linear_weights=[w, q], hidden_size=128, head_dim=64, intermediate_size=64,
                   use_cpu_kernels=True, use_triton=False)
    x = torch.randn(rows, 128, generator=gen).to(torch.bfloat16)
    for weight, dense in ((w, w), (q, q.dequantize())):
        got = ops.linear(x, weight)
        assert got.shape == (rows, dense.shape[0]) and got.is_contiguous()
        torch.testing.assert_close(got.float(), F.linear(x.float(), dense.float()),
                                   rtol=2e-2, atol=2e-2)
