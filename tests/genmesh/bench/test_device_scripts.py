"""scripts/device: the device call's scripts parse, and run.sh works end to end on CPU
(slow: the tiny-llama preset, quick plan, in about a minute)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
SCRIPTS = REPO_ROOT / "scripts" / "device"


@pytest.mark.parametrize("script", ["prepare.sh", "run.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(SCRIPTS / script)], check=True)


def _bench_brief():
    spec = importlib.util.spec_from_file_location("bench_brief", SCRIPTS / "bench_brief.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_brief_reads_partial_and_complete_results():
    brief = _bench_brief().brief
    assert brief({"model": "m", "partial": True, "error": "no result"})[:2] == [
        "bench m (partial)", "  error: no result"]
    lines = brief({"model": "m", "engine": {"throughput": {"1": {
        "tokens_per_s": 10.0, "mean_step_ms": 2.0, "mean_batch_size": 1.0,
        "mean_prepare_ms": 0.5, "mean_forward_ms": 1.0, "mean_sample_ms": None}}},
        "step_profile": {"1": {"step_ms": 2.0, "gpu_busy_ms": 1.0, "gpu_kernels_per_step": 9,
                               "kernel_launches_per_step": 9}, "256": {"skipped": "x"}},
        "ratios": {"vs_hf_static_batch": 1.5}})
    assert lines[0] == "bench m (complete)"
    assert "c=1: 10.0 tok/s" in lines[1] and "0.5/1.0/None ms" in lines[1]
    assert "gpu busy 1.0 ms" in lines[2] and "skipped" in lines[3]


@pytest.mark.slow
def test_run_sh_on_cpu_writes_every_file(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "GENMESH_DEVICE": "cpu", "PYTHON": sys.executable,
           "GENMESH_DEVICE_STAGES": "env bench"}
    subprocess.run(["bash", str(SCRIPTS / "run.sh")], cwd=REPO_ROOT, env=env, check=True,
                   timeout=240, capture_output=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stages"]["bench-tiny-llama"]["rc"] == 0
    result = json.loads((tmp_path / "bench-tiny-llama.json").read_text())
    assert "partial" not in result
    assert all(isinstance(v, float) for v in result["ratios"].values())
    assert (tmp_path / "env.txt").read_text().count("torch") >= 1
