"""`run_engine_bench` end to end on the tiny-llama preset (CPU, a few seconds), with its
HF baseline built from the same shape."""

from __future__ import annotations

import pytest

from genmesh.bench.engine import STEP_PHASE_FIELDS, BenchPlan, run_engine_bench
from services.worker.engine.config import EngineConfig

pytest.importorskip("transformers")

TINY = BenchPlan(concurrency=(1, 4), num_requests_min=4, min_prompt_len=8, max_prompt_len=40,
                 output_len=4, hf_one_at_a_time=1, hf_batch_size=4, prefix_len=64,
                 suffix_len=8, ttft_repeats=1, single_stream_tokens=8)


def test_tiny_preset_gets_every_ratio_and_the_step_phases():
    config = EngineConfig(model="tiny-llama", load_format="dummy", dtype="float32",
                          num_threads=1, num_kv_blocks=256)
    stages: list[set[str]] = []
    result = run_engine_bench(config, TINY, on_progress=lambda r: stages.append(set(r)))

    assert set(result["engine"]["throughput"]) == {"1", "4"}
    for level in result["engine"]["throughput"].values():
        assert level["output_tokens"] == level["requests"] * TINY.output_len
        assert set(STEP_PHASE_FIELDS) <= set(level)  # None before the engine reports them
    assert result["hf"]["static_batch"]["batch_size"] == 4
    assert result["hf"]["static_batch"]["output_tokens"] == 4 * TINY.output_len
    ratios = result["ratios"]
    assert set(ratios) == {"vs_hf_one_at_a_time", "vs_hf_static_batch",
                           "single_stream_vs_hf_one_at_a_time", "warm_prefix_ttft_speedup",
                           "single_stream_roofline_fraction"}
    assert all(isinstance(v, float) and v > 0 for v in ratios.values())
    assert "step_profile" not in result  # CUDA only
    # Progress came stage by stage, the HF baseline last.
    assert "engine" in stages[0] and "hf" not in stages[-2] and "hf" in stages[-1]


def test_without_hf_the_hf_ratios_stay_empty():
    config = EngineConfig(model="tiny-llama", load_format="dummy", dtype="float32",
                          num_threads=1, num_kv_blocks=256)
    result = run_engine_bench(config, TINY, with_hf=False)
    assert "hf" not in result
    assert result["ratios"]["vs_hf_static_batch"] is None
    assert result["ratios"]["single_stream_roofline_fraction"] > 0
