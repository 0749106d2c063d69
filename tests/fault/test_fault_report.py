"""The fault suite's judgement of one kill and its table, from made-up calls (no mesh)."""

from __future__ import annotations

from typing import Any

import pytest

from genmesh.bench.fault_report import (
    CallKind,
    CallRecord,
    FaultRow,
    format_table,
    judge,
    recovery_at,
    table_rows,
)
from genmesh.bench.soak import SoakResult, is_settled, outcome

KILL = 100.0
STREAM, PROBE, CACHED = CallKind.STREAM, CallKind.PROBE, CallKind.CACHED


def call(kind: CallKind, start: float, end: float, code: str = "OK", *,
         first: float | None = None, details: str = "") -> CallRecord:
    return CallRecord(kind, start, end, code, details, first)


def test_in_flight_calls_failing_unavailable_within_a_second_pass():
    calls = [call(STREAM, 98.0, 100.4, "UNAVAILABLE", first=98.5),
             call(STREAM, 99.0, 100.9, "UNAVAILABLE", first=99.5),
             call(STREAM, 90.0, 95.0, "INTERNAL"),  # ended before the kill: not judged
             call(PROBE, 100.2, 100.21, "UNAVAILABLE"),
             call(PROBE, 101.0, 101.1)]
    row = judge(calls, process="frontend", killed_at=KILL, recovered_at=101.0)
    assert row.in_flight_codes == {"UNAVAILABLE": 2}
    assert row.max_failed_end_s == pytest.approx(0.9)
    assert row.max_waiting_end_s is None
    assert row.outage_codes == {"UNAVAILABLE": 1}
    assert row.max_outage_failure_s == pytest.approx(0.01)
    assert row.bystander_rate is None  # every call needs the frontend
    assert row.recovery_s == pytest.approx(1.0)
    assert row.bad_calls == ()
    assert row.is_passed


def test_internal_late_unavailable_and_slow_recovery_are_each_a_miss():
    calls = [call(STREAM, 99.0, 100.3, "INTERNAL", details="Stream removed"),
             call(STREAM, 99.5, 101.5, "UNAVAILABLE", first=99.8),  # 1.5 s after the kill
             call(PROBE, 102.0, 104.0, "UNAVAILABLE")]  # 2 s for a refusal
    row = judge(calls, process="safety", killed_at=KILL, recovered_at=104.5)
    assert len(row.bad_calls) == 3
    assert "INTERNAL 'Stream removed'" in row.bad_calls[0]
    assert "UNAVAILABLE after 1.50 s" in row.bad_calls[1]
    assert "probe during the outage: UNAVAILABLE after 2.00 s" in row.bad_calls[2]
    assert row.recovery_s == pytest.approx(4.5)
    assert not row.is_recovered_in_time  # 3 s without a model load measured
    assert not row.is_passed


def test_a_call_not_yet_streaming_fails_when_it_reaches_the_dead_process():
    """A probe queued at a busy worker reaches moderation (safety dead) seconds after the
    kill: UNAVAILABLE then is right; its end is shown apart, not held to the second."""
    calls = [call(PROBE, 99.0, 102.6, "UNAVAILABLE"),
             call(STREAM, 98.0, 100.1, "UNAVAILABLE", first=98.5),
             call(PROBE, 99.5, 102.7, "INTERNAL", details="boom")]
    row = judge(calls, process="safety", killed_at=KILL, recovered_at=103.0)
    assert row.max_failed_end_s == pytest.approx(0.1)
    assert row.max_waiting_end_s == pytest.approx(2.7)
    assert row.bad_calls == ("probe in flight: INTERNAL 'boom'",)


def test_fail_open_processes_have_only_bystanders_and_each_must_succeed():
    calls = [call(STREAM, 99.0, 103.0), call(CACHED, 100.5, 100.6),
             call(PROBE, 100.1, 100.2, "UNAVAILABLE", details="the cache is unavailable")]
    row = judge(calls, process="cache", killed_at=KILL, recovered_at=101.0)
    assert (row.num_bystanders, row.num_bystanders_ok) == (3, 2)
    assert row.bad_calls == ("probe during the outage, not needing cache: UNAVAILABLE "
                             "'the cache is unavailable'",)
    assert not row.is_passed


def test_cached_answers_do_not_need_the_worker():
    calls = [call(CACHED, 100.5, 100.6), call(STREAM, 99.0, 100.2, "UNAVAILABLE")]
    row = judge(calls, process="worker-v1", killed_at=KILL, recovered_at=104.0,
                model_load_s=3.0)
    assert (row.num_bystanders, row.num_bystanders_ok) == (1, 1)
    assert row.is_passed


def test_streams_already_generating_do_not_need_the_tokenizer():
    generating = call(STREAM, 98.0, 103.0, first=99.0)
    waiting = call(STREAM, 99.9, 100.2, "UNAVAILABLE")  # still being tokenized
    row = judge([generating, waiting], process="tokenizer", killed_at=KILL,
                recovered_at=101.5)
    assert (row.num_bystanders, row.num_bystanders_ok) == (1, 1)
    assert row.in_flight_codes == {"OK": 1, "UNAVAILABLE": 1}
    assert row.is_passed


def test_a_process_that_loads_a_model_has_its_load_time_plus_two_seconds():
    calls = [call(PROBE, 100.1, 100.2, "UNAVAILABLE"), call(PROBE, 112.0, 112.1)]
    row = judge(calls, process="worker-v1", killed_at=KILL, recovered_at=112.0,
                model_load_s=10.5)
    assert row.target_recovery_s == pytest.approx(12.5)
    assert row.is_passed
    # Not for a process that loads none, nor safety (its small model loads in ~1 s).
    for process in ("tokenizer", "safety"):
        assert judge(calls, process=process, killed_at=KILL, recovered_at=112.0,
                     model_load_s=10.5).target_recovery_s == pytest.approx(3.0)


@pytest.mark.parametrize("probes,back_at,expected", [
    # The first success after the last failure, once the process is back.
    ([(100.1, 100.2, "UNAVAILABLE"), (100.3, 100.4, "UNAVAILABLE"), (100.5, 100.6, "OK")],
     100.2, 100.5),
    # No probe failed (a fail-open process): when it is back, before or after any probe.
    ([(100.1, 100.2, "OK"), (100.3, 100.4, "OK")], 101.2, 101.2),
    ([(99.0, 103.0, "OK")], 100.5, 100.5),
    # A success between failures does not count; a probe started before the last failure
    # ended does not either.
    ([(100.1, 100.2, "OK"), (100.3, 100.9, "UNAVAILABLE"), (100.8, 101.0, "OK"),
      (101.0, 101.1, "OK")], 100.0, 101.0),
    # No success since the last failure, or never back: not recovered.
    ([(100.1, 100.2, "OK"), (100.3, 100.4, "UNAVAILABLE")], 100.0, None),
    ([(100.3, 100.4, "UNAVAILABLE"), (100.35, 100.8, "OK")], 100.0, None),
    ([(100.1, 100.2, "OK")], None, None),
])
def test_recovery_is_the_first_good_probe_after_the_last_failure(probes, back_at, expected):
    records = [call(PROBE, s, e, code) for s, e, code in probes]
    got = recovery_at(records, killed_at=KILL, back_at=back_at)
    assert got == (None if expected is None else pytest.approx(expected))


def test_the_table_has_a_row_per_kill_and_lists_what_missed():
    ok = FaultRow("cache", {"OK": 4}, None, {"OK": 2}, None, None, 6, 6, 1.21, 3.0, ())
    missed = FaultRow("frontend", {"INTERNAL": 3}, 0.01, {}, None, None, 0, 0, 1.5, 3.0,
                      ("stream in flight: INTERNAL 'x'",) * 7,
                      wire_codes={"INTERNAL -> UNAVAILABLE": 2})
    worker = FaultRow("worker-v1", {"UNAVAILABLE": 5}, 0.1, {"UNAVAILABLE": 40}, 0.1, 2.5,
                      0, 0, 13.5, 15.0, (), model_load_s=13.0)
    assert table_rows([ok]) == [("cache", "OK 4", "-", "OK 2", "-", "6/6 (100%)", "1.21",
                                 "3.00", "yes")]
    text = format_table([ok, missed, worker])
    lines = text.splitlines()
    assert lines[0].startswith("| process ") and lines[1].startswith("| ---")
    assert lines[3].startswith("| frontend ") and lines[3].rstrip().endswith("| NO   |")
    assert "worker-v1: restarted process loaded in 13.00 s (start to serving)" in lines
    assert "frontend: on the wire: INTERNAL -> UNAVAILABLE 2" in lines
    assert ("worker-v1: in flight before their output began, failed calls ended by 2.50 s "
            "after the kill") in lines
    assert lines.count("frontend: stream in flight: INTERNAL 'x'") == 5
    assert "frontend: ... 2 more calls" in lines


def test_soak_outcomes_allow_configured_limits_and_the_clients_own_cancels():
    assert outcome("OK", "", is_cancelled_by_client=False) == ("OK", None)
    assert outcome("CANCELLED", "", is_cancelled_by_client=True) == ("CANCELLED by client",
                                                                      None)
    assert outcome("RESOURCE_EXHAUSTED", "over its limit",
                   is_cancelled_by_client=False) == ("RESOURCE_EXHAUSTED", None)
    assert outcome("CANCELLED", "server", is_cancelled_by_client=False) == (
        "CANCELLED", "CANCELLED: server")
    assert outcome("INTERNAL", "boom", is_cancelled_by_client=False)[1] == "INTERNAL: boom"


def test_soak_passes_only_with_no_error_a_free_pool_and_flat_memory():
    def result(**kw: Any) -> SoakResult:
        base: dict[str, Any] = dict(
            codes={"OK": 10}, errors={}, refusals={}, kv_blocks_total=100, kv_blocks_free=100,
            rss_after_warmup_mib={"frontend": 100.0, "worker-v1": 400.0},
            rss_at_end_mib={"frontend": 109.0, "worker-v1": 380.0}, max_rss_growth=0.10,
            restarts={"frontend": 0}, rss_samples_mib={}, duration_s=120.0, num_streams=64)
        return SoakResult(**(base | kw))

    assert result().is_passed
    assert result().rss_growth() == {"frontend": pytest.approx(0.09),
                                     "worker-v1": pytest.approx(-0.05)}
    assert not result(errors={"INTERNAL: x": 1}).is_passed
    assert not result(kv_blocks_free=99).is_passed
    assert not result(rss_at_end_mib={"frontend": 111.0, "worker-v1": 400.0}).is_passed
    assert not result(restarts={"frontend": 1}).is_passed


def test_the_warm_up_ends_once_every_process_has_stopped_growing():
    # window=3: the latest sample against the one 3 samples before it.
    assert not is_settled({"worker": [100.0, 101.0, 102.0]}, window=3, tolerance=0.02)
    assert is_settled({"worker": [100.0, 101.0, 102.0, 101.5]}, window=3, tolerance=0.02)
    assert not is_settled({"worker": [100.0, 101.0, 102.0, 102.1]}, window=3, tolerance=0.02)
    # a process that shrank has settled; every process must have
    assert is_settled({"redis": [10.0, 12.0, 11.0, 9.0]}, window=3, tolerance=0.0)
    assert not is_settled({"redis": [10.0, 10.0, 10.0, 10.0],
                           "worker": [100.0, 110.0, 120.0, 130.0]}, window=3, tolerance=0.02)
