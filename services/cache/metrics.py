"""The cache service's Prometheus series, derived from the counts the servicer and the
store keep (one source of truth, which ``GetStats`` also reports)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from services.common.telemetry import FollowedTotal

_LOOKUPS = Counter("genmesh_cache_lookups", "Lookups (result: hit, shared, lease, miss)",
                   ["result"])
STORES = FollowedTotal(Counter("genmesh_cache_stores", "Answers stored"))
EVICTIONS = FollowedTotal(Counter("genmesh_cache_evictions",
                                  "Entries dropped for the memory cap"))
STORE_ERRORS = FollowedTotal(Counter("genmesh_cache_store_errors",
                                     "Calls answered UNAVAILABLE: the store was down or slow"))
LOOKUPS = {result: FollowedTotal(_LOOKUPS.labels(result))
           for result in ("hit", "shared", "lease", "miss")}
ENTRIES = Gauge("genmesh_cache_entries", "Answers held")
BYTES = Gauge("genmesh_cache_bytes", "Bytes of the answers held (what the cap counts)")
