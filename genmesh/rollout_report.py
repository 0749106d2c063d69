"""`genmesh rollout report`: how the shadow version's answers compare with the primary's.

Pairs the workers' generation records (``genmesh/core/records.py``) by request id:
each mirrored call has one record from the primary and one from the shadow. Reports
exact-match rate, token-level agreement, and the shadow's TTFT and decode speed against
the primary's.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

from genmesh.core.records import GenerationRecord


def token_agreement(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Share of positions where both sequences have the same token, over the longer one."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    return sum(x == y for x, y in zip(a, b, strict=False)) / longest


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def compare(records: Iterable[GenerationRecord]) -> dict[str, Any]:
    primary: dict[str, GenerationRecord] = {}
    shadow: dict[str, GenerationRecord] = {}
    for r in records:
        (shadow if r.is_shadow else primary)[r.request_id] = r
    pairs = [(primary[rid], shadow[rid]) for rid in shadow if rid in primary]
    out: dict[str, Any] = {
        "num_pairs": len(pairs),
        "num_shadow_records": len(shadow),
        "num_shadow_unpaired": len(shadow) - len(pairs),
    }
    if not pairs:
        return out
    versions = sorted({(p.model_version, s.model_version) for p, s in pairs})
    ttft_delta = [s.ttft_ms - p.ttft_ms for p, s in pairs]
    speeds = [(p.decode_tokens_per_s, s.decode_tokens_per_s) for p, s in pairs
              if p.decode_tokens_per_s > 0 and s.decode_tokens_per_s > 0]
    out |= {
        "versions": [{"primary": p, "shadow": s} for p, s in versions],
        "exact_match_rate": round(sum(p.token_ids == s.token_ids for p, s in pairs)
                                  / len(pairs), 4),
        "token_agreement": round(statistics.fmean(
            token_agreement(p.token_ids, s.token_ids) for p, s in pairs), 4),
        "common_prefix_tokens_mean": round(statistics.fmean(
            common_prefix(p.token_ids, s.token_ids) for p, s in pairs), 2),
        "ttft_ms": {"primary_p50": _p50(p.ttft_ms for p, _ in pairs),
                    "shadow_p50": _p50(s.ttft_ms for _, s in pairs),
                    "delta_p50": _p50(ttft_delta)},
    }
    if speeds:
        out["decode_tokens_per_s"] = {
            "primary_p50": _p50(p for p, _ in speeds), "shadow_p50": _p50(s for _, s in speeds),
            "delta_p50": _p50(s - p for p, s in speeds)}
    return out


def _p50(values: Iterable[float]) -> float:
    return round(statistics.median(list(values)), 3)
