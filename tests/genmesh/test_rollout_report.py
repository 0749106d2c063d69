"""The shadow report: pairing records by request id, agreement and latency deltas."""

from __future__ import annotations

from genmesh.core.records import GenerationRecord
from genmesh.rollout_report import common_prefix, compare, token_agreement


def record(rid: str, shadow: bool, tokens: tuple[int, ...], ttft: float, speed: float
           ) -> GenerationRecord:
    return GenerationRecord(rid, "v2" if shadow else "v1", shadow, tokens, "length", ttft, speed)


def test_agreement_measures():
    assert token_agreement((1, 2, 3), (1, 2, 3)) == 1.0
    assert token_agreement((1, 2, 3, 4), (1, 9, 3)) == 0.5
    assert token_agreement((), ()) == 1.0
    assert common_prefix((1, 2, 3), (1, 2, 4)) == 2


def test_compare_pairs_by_request_id():
    records = [record("a", False, (1, 2, 3, 4), 10, 100), record("a", True, (1, 2, 3, 4), 14, 80),
               record("b", False, (5, 6), 20, 50), record("b", True, (5, 7), 22, 40),
               record("c", True, (1,), 5, 0)]  # its primary record is missing
    report = compare(records)
    assert report["num_pairs"] == 2 and report["num_shadow_unpaired"] == 1
    assert report["exact_match_rate"] == 0.5
    assert report["token_agreement"] == 0.75
    assert report["ttft_ms"]["delta_p50"] == 3.0
    assert report["decode_tokens_per_s"]["delta_p50"] == -15.0
    assert report["versions"] == [{"primary": "v1", "shadow": "v2"}]


def test_records_round_trip_through_stream_fields():
    r = record("x", True, (3, 1, 4), 1.5, 9.25)
    assert GenerationRecord.from_fields(r.to_fields()) == r
    assert compare([])["num_pairs"] == 0
