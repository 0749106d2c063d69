"""Generation records: what each finished request produced and how fast.

Workers append them to a capped Redis stream (``services/worker/records.py``, the only
writer); ``genmesh rollout report`` reads them back and pairs a shadow version's answers
with the primary's by request id (``genmesh/rollout_report.py``). This module is the
format both sides agree on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# The Redis stream the records go to.
STREAM = "genmesh:rollout:records"


@dataclass(frozen=True, slots=True)
class GenerationRecord:
    request_id: str  # the worker request id: equal on the primary and its shadow copy
    model_version: str
    is_shadow: bool
    token_ids: tuple[int, ...]  # every generated token
    finish_reason: str
    ttft_ms: float  # call start → first token
    decode_tokens_per_s: float  # after the first token; 0 with one token or fewer

    def to_fields(self) -> dict[str, str]:
        fields = asdict(self)
        fields["is_shadow"] = "1" if self.is_shadow else "0"
        fields["token_ids"] = ",".join(map(str, self.token_ids))
        return {k: str(v) for k, v in fields.items()}

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> GenerationRecord:
        return cls(request_id=fields["request_id"], model_version=fields["model_version"],
                   is_shadow=fields["is_shadow"] == "1",
                   token_ids=tuple(int(t) for t in fields["token_ids"].split(",") if t),
                   finish_reason=fields["finish_reason"], ttft_ms=float(fields["ttft_ms"]),
                   decode_tokens_per_s=float(fields["decode_tokens_per_s"]))
