"""`bench serve`'s plot writer: both PNGs, from a result with two targets."""

from __future__ import annotations

from pathlib import Path

from genmesh.bench.plots import write_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def level(scale: float, *, empty: bool = False) -> dict:
    dist = {"mean": None, "p50": None, "p90": None, "p99": None} if empty else {
        "mean": 10 * scale, "p50": 9 * scale, "p90": 15 * scale, "p99": 20 * scale}
    return {"ttft_ms": dist, "tpot_ms": dist, "itl_ms": dist, "e2e_ms": dist,
            "goodput": 1 / scale, "request_throughput": 2 / scale,
            "output_throughput": 64 / scale}


def test_write_plots_makes_two_pngs(tmp_path: Path):
    result = {
        "model": "m", "max_tokens": 8, "workload": {"name": "mixed"},
        "load": {"kind": "concurrency", "levels": ["1", "4"]},
        "slo": {"ttft_ms": 100.0, "tpot_ms": 20.0},
        "targets": {"mesh": {"levels": {"1": level(1), "4": level(2)}},
                    # a level where nothing completed has no latencies: no point drawn
                    "seed-fastapi": {"levels": {"1": level(3), "4": level(9, empty=True)}}},
        "goodput_ratio": {"best_level": 3.0},
    }
    paths = write_plots(result, tmp_path / "plots")
    assert [p.name for p in paths] == ["latency.png", "goodput.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
