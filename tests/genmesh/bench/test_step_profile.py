"""Profiled decode steps: the trace reduction (pure) and the step driving (CPU)."""

from __future__ import annotations

import pytest

from genmesh.bench.engine import make_prompts
from genmesh.bench.step_profile import profile_decode_steps, summarize_trace
from services.worker.engine.config import EngineConfig
from services.worker.engine.core import EngineCore


def _x(cat: str, name: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_summarize_trace_counts_per_step():
    trace = {"traceEvents": [
        {"ph": "M", "name": "process_name"},  # metadata: ignored
        _x("cpu_op", "aten::mm", 0, 50),
        _x("cuda_runtime", "cudaLaunchKernel", 0, 4),
        _x("cuda_runtime", "cudaLaunchKernel", 10, 4),
        _x("cuda_driver", "cuLaunchKernel", 20, 2),  # Triton launches through the driver
        _x("cuda_runtime", "cudaMemcpyAsync", 30, 10),
        _x("kernel", "gemm", 5, 20),
        _x("kernel", "gemm", 40, 20),
        _x("kernel", "softmax", 50, 20),  # overlaps the second gemm by 10 us
        _x("gpu_memcpy", "Memcpy DtoH", 100, 10),
    ]}
    s = summarize_trace(trace, num_steps=2)
    assert s.gpu_busy_ms == pytest.approx((20 + 30 + 10) / 1e3 / 2)  # union: 5-25, 40-70, 100-110
    assert s.num_gpu_kernels == 1.5
    assert s.num_launches == 1.5
    assert s.cuda_api_ms == pytest.approx(20 / 1e3 / 2)
    assert s.top_kernels == [("gemm", pytest.approx(2 / 3)), ("softmax", pytest.approx(1 / 3))]


def test_summarize_empty_trace():
    s = summarize_trace({"traceEvents": []}, num_steps=3)
    assert (s.gpu_busy_ms, s.num_gpu_kernels, s.num_launches, s.top_kernels) == (0, 0, 0, [])


def test_profile_decode_steps_on_cpu_times_full_decode_batches_and_cleans_up():
    core = EngineCore(EngineConfig(model="tiny-llama", load_format="dummy", dtype="float32",
                                   num_threads=1, num_kv_blocks=64,
                                   max_num_batched_tokens=16))
    # Prefill takes 10 steps; the first request decodes meanwhile and must not run out.
    prompts = make_prompts(4, vocab_size=core.model_cfg.vocab_size, min_len=40, max_len=40)
    profile = profile_decode_steps(core, prompts, num_steps=3, num_warmup=1)
    assert profile.batch_size == 4.0  # every timed step decodes the whole batch
    assert profile.num_steps == 3 and profile.step_ms > 0 and profile.profiled_step_ms > 0
    assert profile.trace is None  # no GPU
    assert set(profile.as_dict()) == {"batch_size", "context_len", "num_steps", "step_ms",
                                      "profiled_step_ms"}
    assert not core.has_work() and core.blocks.num_free_blocks == 64
