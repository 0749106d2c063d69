"""The rate-limit service's Prometheus series."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Counter

from services.ratelimit.limiter import Decision, Descriptor

DECISIONS = Counter("genmesh_ratelimit_decisions",
                    "Global rate-limit decisions, per descriptor (result: ok, over_limit)",
                    ["tenant", "result"])


def count(descriptors: Sequence[Descriptor], decisions: Sequence[Decision]) -> None:
    for descriptor, decision in zip(descriptors, decisions, strict=True):
        tenant = dict(descriptor.entries).get("tenant", "")
        DECISIONS.labels(tenant, "over_limit" if decision.is_over_limit else "ok").inc()
