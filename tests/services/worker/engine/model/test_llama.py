"""The one-call decode path computes exactly what the Python layer loop computes, with
bf16 and with quantized weights."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from services.worker.engine.config import EngineConfig
from services.worker.engine.core import EngineCore
from services.worker.engine.params import SamplingParams


@pytest.mark.parametrize(("num_requests", "quantization"), [
    (1, "none"), (2, "none"), (2, "int8"), (2, "int4")])
def test_one_call_decode_equals_the_layer_loop(model_dir, monkeypatch, num_requests,
                                               quantization):
    core = EngineCore(EngineConfig(model=str(model_dir), dtype="bfloat16", num_kv_blocks=64,
                                   quantization=quantization))
    model = core.runner.model
    if model.ops.decode_layers is None:
        pytest.skip("needs the CPU kernels (AVX512-BF16)")
    for i in range(num_requests):
        core.add(core.make_request(f"r{i}", list(range(1000 + 40 * i, 1030 + 40 * i)),
                                   SamplingParams(max_tokens=50, ignore_eos=True)))
    for _ in range(3):
        core.step()  # prefill, then decodes
    out = core.scheduler.schedule()
    assert all(c.num_tokens == 1 for c in out.chunks)
    tables = [core.blocks.block_ids(c.request.request_id) for c in out.chunks]

    calls = []
    real = model.ops.decode_layers

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(model, "ops", replace(model.ops, decode_layers=spy))
    one_call = core.runner.execute(out.chunks, tables)
    monkeypatch.setattr(model, "_can_decode_in_one_call", lambda meta, n: False)
    layer_loop = core.runner.execute(out.chunks, tables)  # rewrites the same KV slots
    assert calls == [1]
    assert torch.equal(one_call, layer_loop)


@pytest.mark.parametrize("rows", [1, 3])
def test_top_indices_through_block_maxima_are_topks_set(rows):
    from services.worker.engine.model.llama import top_indices

    gen = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, 49152, generator=gen)
    logits[0, 64:128] = 10.0 + torch.arange(64.0)  # one block holding every one of them
    got, expected = top_indices(logits, 64), logits.topk(64, dim=1).indices
    assert got.shape == (rows, 64)
    for r in range(rows):
        assert sorted(got[r].tolist()) == sorted(expected[r].tolist())
    assert sorted(got[0].tolist()) == list(range(64, 128))
    small = torch.tensor([[3.0, 1.0, 2.0]])  # fewer blocks than k: topk itself
    assert sorted(top_indices(small, 2)[0].tolist()) == [0, 2]
