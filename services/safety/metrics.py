"""The safety service's Prometheus series."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Histogram

from services.safety.audit import AuditRecord

DECISIONS = Counter(
    "genmesh_safety_decisions", "Safety decisions, one per finding ('none' for a clean text)",
    ["direction", "category", "action"])
CHECK_SECONDS = Histogram(
    "genmesh_safety_check_seconds", "Time to check a prompt or moderate one streamed chunk",
    ["direction"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                            1.0, 2.5))
# Prompt checks run in micro-batches (batcher.py): how many prompts each batch held, and
# how many texts (windows and decoded views) its one embedding call took.
CHECK_BATCH_PROMPTS = Histogram(
    "genmesh_safety_check_batch_prompts", "Prompts checked together in one batch",
    buckets=(1, 2, 4, 8, 16, 32, 64))
CHECK_BATCH_WINDOWS = Histogram(
    "genmesh_safety_check_batch_windows", "Texts embedded together for one batch of prompts",
    buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128))
# The classifier's scores kept per text (score_cache.py): texts found, and texts computed.
SCORE_CACHE_TEXTS = Counter(
    "genmesh_safety_score_cache_texts", "Texts a prompt check scored, by whether the score "
    "was kept from before (hit) or computed (miss)", ["result"])


def count_decisions(records: Iterable[AuditRecord]) -> None:
    for r in records:
        DECISIONS.labels(r.direction, r.category, r.action).inc()
