"""`bench serve`'s figures from hand-made timings: percentiles, TPOT, ITL, goodput."""

from __future__ import annotations

import pytest

from genmesh.bench.serve import goodput_ratios
from genmesh.bench.serve_metrics import (
    RequestRecord,
    RequestStatus,
    Slo,
    distribution_ms,
    summarize_level,
)

# ttft 100 ms, e2e 500 ms, 4 tokens: TPOT (500 - 100) / 3 = 133.3 ms; gaps 100, 200 ms.
SLOW_DECODE = RequestRecord(0.0, (0.1, 0.2, 0.4), 0.5, prompt_tokens=10, output_tokens=4)
# ttft 300 ms, e2e 400 ms, 2 tokens: TPOT 100 ms; one gap of 50 ms.
SLOW_START = RequestRecord(1.0, (1.3, 1.35), 1.4, prompt_tokens=20, output_tokens=2)
# One token: no TPOT (the TTFT SLO alone decides), no gap.
ONE_TOKEN = RequestRecord(2.0, (2.05,), 2.05, prompt_tokens=30, output_tokens=1)
FAILED = RequestRecord(3.0, (3.1,), 3.2, 0, 0, RequestStatus.FAILED, "UNAVAILABLE: down")
CANCELLED = RequestRecord(4.0, (), 4.0, 0, 0, RequestStatus.CANCELLED)
SLO = Slo(ttft_ms=200, tpot_ms=120)


def test_per_request_latencies():
    assert SLOW_DECODE.ttft_s == pytest.approx(0.1)
    assert SLOW_DECODE.tpot_s == pytest.approx(0.4 / 3)
    assert SLOW_DECODE.itls_s == pytest.approx([0.1, 0.2])
    assert SLOW_START.tpot_s == pytest.approx(0.1)
    assert ONE_TOKEN.tpot_s is None and ONE_TOKEN.itls_s == []


def test_the_slo_needs_both_ttft_and_tpot_and_a_whole_answer():
    assert not SLO.is_met(SLOW_DECODE)  # TPOT 133 > 120
    assert not SLO.is_met(SLOW_START)  # TTFT 300 > 200
    assert SLO.is_met(ONE_TOKEN)
    assert not SLO.is_met(FAILED)
    assert Slo(ttft_ms=100, tpot_ms=1000).is_met(SLOW_DECODE)  # bounds are inclusive


def test_percentiles_interpolate_linearly():
    # [50, 100, 300] ms: p90 sits 80% of the way from 100 to 300, p99 98%.
    assert distribution_ms([0.1, 0.3, 0.05]) == {"mean": 150.0, "p50": 100.0, "p90": 260.0,
                                                 "p99": 296.0}
    assert distribution_ms([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_a_level_summary():
    s = summarize_level([SLOW_DECODE, SLOW_START, ONE_TOKEN, FAILED, CANCELLED],
                        duration_s=4.0, slo=SLO)
    assert {k: s[k] for k in ("num_requests", "num_completed", "num_failed", "num_cancelled",
                              "errors", "input_tokens", "output_tokens", "num_good")} == {
        "num_requests": 5, "num_completed": 3, "num_failed": 1, "num_cancelled": 1,
        "errors": ["UNAVAILABLE: down"], "input_tokens": 60, "output_tokens": 7,
        "num_good": 1}
    assert s["request_throughput"] == 0.75  # 3 completed in 4 s
    assert s["output_throughput"] == 1.75
    assert s["total_token_throughput"] == 16.75
    assert s["goodput"] == 0.25  # 1 good request in 4 s
    assert s["slo_attainment"] == 0.2  # of all 5 sent
    assert s["ttft_ms"]["p50"] == 100.0
    assert s["tpot_ms"] == {"mean": 116.667, "p50": 116.667, "p90": 130.0, "p99": 133.0}
    assert s["itl_ms"] == {"mean": 116.667, "p50": 100.0, "p90": 180.0, "p99": 198.0}
    assert s["e2e_ms"]["p50"] == 400.0
    # x0.5: 100 ms / 60 ms, ONE_TOKEN only; x2: 400 ms / 240 ms, all three.
    assert s["goodput_by_slo_scale"] == {"0.5": 0.25, "1": 0.25, "2": 0.75, "4": 0.75}


def test_goodput_ratios_per_level_and_at_the_best_levels():
    def level(goodput: float, at_double: float) -> dict:
        return {"goodput": goodput, "goodput_by_slo_scale": {"1": goodput, "2": at_double}}

    mesh = {"1": level(1.0, 1.0), "4": level(3.0, 4.0)}
    seed = {"1": level(0.5, 1.0), "4": level(0.0, 2.0)}
    assert goodput_ratios(mesh, seed) == {
        "per_level": {"1": 2.0, "4": None}, "best_level": 6.0,
        "best_goodput": {"mesh": 3.0, "seed-fastapi": 0.5},
        "best_level_by_slo_scale": {"1": 6.0, "2": 2.0}}
