"""Issue 19's fault injection and soak on the real mesh (Envoy, Redis, every service, one
worker of the default model), as `genmesh fault kill` and `genmesh fault soak` run them.
Slow: minutes each. The table and figures are printed (``-s`` shows them)."""

from __future__ import annotations

import pytest

from genmesh.bench.fault import FaultConfig, run_fault_suite
from genmesh.bench.fault_report import format_table
from genmesh.bench.soak import SoakConfig, format_soak, run_soak


@pytest.mark.slow
def test_every_process_killed_under_load_fails_calls_fast_and_comes_back(
        model_dir, tmp_path, capsys):
    rows = run_fault_suite(FaultConfig(), run_dir=tmp_path / "run")
    table = format_table(rows)
    with capsys.disabled():
        print("\n" + table)
    assert [r.process for r in rows] == list(FaultConfig().processes)
    assert all(r.is_passed for r in rows), table


@pytest.mark.slow
def test_soak_of_64_streams_with_random_cancels(model_dir, tmp_path, capsys):
    result = run_soak(SoakConfig(), run_dir=tmp_path / "run")
    text = format_soak(result)
    with capsys.disabled():
        print("\n" + text)
    assert not result.errors, text
    assert result.kv_blocks_free == result.kv_blocks_total, text
    assert not any(result.restarts.values()), text
    assert all(g <= result.max_rss_growth for g in result.rss_growth().values()), text
