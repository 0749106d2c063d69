"""What `genmesh bench serve` reports for one load level, from per-request timings.

The definitions are vLLM's benchmark_serving ones, so figures compare:
- TTFT: from sending the request to its first chunk of text.
- TPOT (time per output token): (end-to-end - TTFT) / (output tokens - 1), per request;
  undefined for a one-token answer.
- ITL (inter-token latency): gaps between consecutive chunks of text, every request's
  pooled. A chunk may carry more than one token (a detokenizer waiting for a whole
  character, moderation holding text back), so ITL can exceed TPOT.
- E2E: from sending to the last message.
- Goodput: requests per second that finished and met every SLO (TTFT and TPOT), over
  the level's duration. Percentiles interpolate linearly (numpy's default).
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
# Goodput is also counted under the SLO scaled by these factors (both bounds together):
# how strict an SLO must be before the ranking of two servers flips.
SLO_SCALES = (0.5, 1.0, 2.0, 4.0)


class RequestStatus(enum.Enum):
    OK = "ok"  # the answer arrived whole
    FAILED = "failed"  # the server answered with an error, or the connection broke
    CANCELLED = "cancelled"  # still running when the level's time ran out


@dataclass(frozen=True, slots=True)
class RequestRecord:
    start_s: float  # time.perf_counter() when the request was sent
    chunk_times_s: tuple[float, ...]  # arrival of each chunk that carried text
    end_s: float  # arrival of the last message (or of the error)
    prompt_tokens: int  # as the server counted them (0 when it did not say)
    output_tokens: int  # as the server counted them
    status: RequestStatus = RequestStatus.OK
    error: str = ""  # with FAILED: what the server or the transport said

    @property
    def is_ok(self) -> bool:
        return self.status is RequestStatus.OK and bool(self.chunk_times_s)

    @property
    def ttft_s(self) -> float:
        return self.chunk_times_s[0] - self.start_s

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itls_s(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.chunk_times_s)]


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_ms: float  # a good request's first text arrives within this
    tpot_ms: float  # ... and its mean time per output token is at most this

    def scaled(self, factor: float) -> Slo:
        return Slo(self.ttft_ms * factor, self.tpot_ms * factor)

    def is_met(self, record: RequestRecord) -> bool:
        if not record.is_ok or record.ttft_s * 1e3 > self.ttft_ms:
            return False
        tpot = record.tpot_s
        return tpot is None or tpot * 1e3 <= self.tpot_ms


def distribution_ms(values_s: list[float]) -> dict[str, float | None]:
    """Mean and percentiles in milliseconds (None for no values)."""
    if not values_s:
        return dict.fromkeys(["mean", *(f"p{p}" for p in PERCENTILES)], None)
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    out: dict[str, float | None] = {"mean": round(float(ms.mean()), 3)}
    for p in PERCENTILES:
        out[f"p{p}"] = round(float(np.percentile(ms, p)), 3)
    return out


def summarize_level(records: list[RequestRecord], *, duration_s: float, slo: Slo
                    ) -> dict[str, Any]:
    """One level's figures; ``duration_s``: from its first send to its last answer."""
    done = [r for r in records if r.is_ok]
    failed = [r for r in records if not r.is_ok and r.status is not RequestStatus.CANCELLED]
    num_cancelled = sum(r.status is RequestStatus.CANCELLED for r in records)
    num_good = sum(slo.is_met(r) for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    input_tokens = sum(r.prompt_tokens for r in done)
    tpots = [t for r in done if (t := r.tpot_s) is not None]
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    return {
        "num_requests": len(records), "num_completed": len(done), "num_failed": len(failed),
        "num_cancelled": num_cancelled,
        "errors": sorted({r.error for r in failed})[:3],
        "duration_s": round(duration_s, 3),
        "input_tokens": input_tokens, "output_tokens": output_tokens,
        "request_throughput": round(len(done) * per_s, 4),
        "output_throughput": round(output_tokens * per_s, 3),
        "total_token_throughput": round((input_tokens + output_tokens) * per_s, 3),
        "ttft_ms": distribution_ms([r.ttft_s for r in done]),
        "tpot_ms": distribution_ms(tpots),
        "itl_ms": distribution_ms([g for r in done for g in r.itls_s]),
        "e2e_ms": distribution_ms([r.e2e_s for r in done]),
        "num_good": num_good,
        "goodput": round(num_good * per_s, 4),
        "slo_attainment": round(num_good / len(records), 4) if records else 0.0,
        "goodput_by_slo_scale": {
            f"{k:g}": round(sum(slo.scaled(k).is_met(r) for r in done) * per_s, 4)
            for k in SLO_SCALES},
    }
