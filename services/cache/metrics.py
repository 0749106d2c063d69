"""The cache service's Prometheus series."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

LOOKUPS = Counter("genmesh_cache_lookups", "Lookups (result: hit, shared, lease, miss)",
                  ["result"])
STORES = Counter("genmesh_cache_stores", "Answers stored")
EVICTIONS = Counter("genmesh_cache_evictions", "Entries dropped for the memory cap")
STORE_ERRORS = Counter("genmesh_cache_store_errors",
                       "Calls answered UNAVAILABLE: the store was down or slow")
ENTRIES = Gauge("genmesh_cache_entries", "Answers held")
BYTES = Gauge("genmesh_cache_bytes", "Bytes of the answers held (what the cap counts)")
