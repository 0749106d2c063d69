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
