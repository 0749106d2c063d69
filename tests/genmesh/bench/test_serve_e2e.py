"""`bench serve` against real processes: a tiny sweep through the test session's mesh
(fast), and the whole command with a started mesh and the seed-fastapi baseline (slow)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from genmesh.bench.serve import LoadLevel, ServeBenchConfig, sweep_http, sweep_mesh
from genmesh.bench.serve_metrics import Slo
from genmesh.bench.serve_workload import WorkloadSpec
from genmesh.cli import main
from tests.conftest import RunningMesh


def tiny(workload: WorkloadSpec, *levels: LoadLevel) -> ServeBenchConfig:
    return ServeBenchConfig(levels=levels, workload=workload, max_tokens=4, slo=Slo(60_000, 60_000),
                            num_warmups=0, duration_limit_s=60, request_timeout_s=60)


@pytest.mark.parametrize(("workload", "labels"), [
    # Streaming Generate, at a fixed concurrency and at a Poisson rate.
    (WorkloadSpec("mixed", num_requests=2, max_input_words=32), ["1", "50"]),
    # One bidi Chat session of two turns.
    (WorkloadSpec("chat", num_requests=2, num_turns=2), ["1"])], ids=["mixed", "chat"])
def test_a_tiny_sweep_through_the_mesh(mesh: RunningMesh, workload: WorkloadSpec,
                                       labels: list[str]):
    load = [LoadLevel(concurrency=1), LoadLevel(request_rate=50.0)][:len(labels)]
    summaries = asyncio.run(sweep_mesh(mesh.edge_address, tiny(workload, *load), api_key=None))
    assert list(summaries) == labels
    for summary in summaries.values():
        assert summary["errors"] == []
        assert summary["num_completed"] == summary["num_good"] == 2
        assert summary["output_tokens"] == 2 * 4  # EOS ignored: every answer is whole
        assert summary["input_tokens"] > 2 * 20
        assert 0 < summary["ttft_ms"]["p50"] <= summary["e2e_ms"]["p50"]
        assert summary["tpot_ms"]["p50"] > 0 and summary["goodput"] > 0


@pytest.mark.parametrize("workload", [WorkloadSpec("mixed", num_requests=2, max_input_words=32),
                                      WorkloadSpec("chat", num_requests=1, num_turns=2)],
                         ids=["mixed", "chat"])
def test_a_tiny_sweep_through_the_http_api(mesh: RunningMesh, workload: WorkloadSpec):
    grpc_side = asyncio.run(sweep_mesh(mesh.edge_address, tiny(
        workload, LoadLevel(concurrency=2)), api_key=None))
    summaries = asyncio.run(sweep_http(mesh.edge_address, tiny(
        workload, LoadLevel(concurrency=2)), api_key="genmesh-dev-key"))
    (summary,) = summaries.values()
    assert summary["errors"] == [] and summary["num_completed"] == 2
    assert summary["output_tokens"] == 2 * 4
    # The same prompts and template through either door.
    assert summary["input_tokens"] == grpc_side["2"]["input_tokens"]


@pytest.mark.slow
def test_bench_serve_with_a_started_mesh_and_the_seed_baseline(tmp_path: Path,
                                                                 model_dir: Path):
    out = tmp_path / "serve.json"
    code = main(["bench", "serve", "--start-mesh", "--baseline", "seed-fastapi",
                 "--concurrency", "1,2", "--num-prompts", "2", "--max-tokens", "8",
                 "--max-input-words", "48", "--num-warmups", "1", "--output", str(out),
                 "--plot-dir", str(tmp_path / "plots")])
    assert code == 0
    result = json.loads(out.read_text())
    mesh, seed = (result["targets"][name]["levels"] for name in ("mesh", "seed-fastapi"))
    for levels in (mesh, seed):
        assert list(levels) == ["1", "2"]
        assert all(s["num_completed"] == 2 and s["output_tokens"] == 16
                   for s in levels.values())
    # The same prompts, rendered with the same chat template, on both sides.
    assert [s["input_tokens"] for s in mesh.values()] == [
        s["input_tokens"] for s in seed.values()]
    assert set(result["goodput_ratio"]["per_level"]) == {"1", "2"}
    for name in ("latency.png", "goodput.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"
