"""`genmesh bench engine --quick` end to end (slow: run with -m slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_engine_bench_prints_the_ratios(tmp_path, model_dir):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "genmesh.cli", "bench", "engine", "--quick",
                    "--output", str(out)], check=True, timeout=300, capture_output=True)
    result = json.loads(out.read_text())
    ratios = result["ratios"]
    assert set(ratios) == {"vs_hf_one_at_a_time", "vs_hf_static_batch",
                           "single_stream_vs_hf_one_at_a_time", "warm_prefix_ttft_speedup",
                           "single_stream_roofline_fraction"}
    assert all(isinstance(v, float) and v > 0 for v in ratios.values())
    assert set(result["engine"]["throughput"]) == {"1", "8", "32", "64"}
