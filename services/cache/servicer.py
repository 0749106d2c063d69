"""The Cache service: validates keys, calls the answer store, maps a store that is down
to UNAVAILABLE (the frontend then bypasses the cache), and counts what happened."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from genmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2
from services.cache import metrics
from services.cache.keys import BadKeyError, entry_key
from services.cache.store import AnswerStore, EntryKey, StoreUnavailable

# Only complete answers are worth replaying: an aborted, filtered or failed generation
# is not the answer to the request.
CACHEABLE = frozenset({common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH})


@dataclass(slots=True)
class Counters:
    num_lookups: int = 0
    num_hits: int = 0  # includes shared ones
    num_shared: int = 0
    num_leases: int = 0
    num_misses: int = 0  # without a lease
    num_stores: int = 0
    num_store_errors: int = 0


class CacheServicer(cache_pb2_grpc.CacheServicer):
    def __init__(self, store: AnswerStore) -> None:
        self.store = store
        self.counters = Counters()

    async def Lookup(self, request: cache_pb2.LookupRequest,
                     context: grpc.aio.ServicerContext) -> cache_pb2.CacheLookupResponse:
        key = await self._key(request.key, context)
        self.counters.num_lookups += 1
        try:
            value = await self.store.get(key)
            if value is not None:
                return self._hit(value, shared=False)
            if not request.single_flight:
                return cache_pb2.CacheLookupResponse()
            lease_id = await self.store.acquire_lease(key, lease_ms=request.lease_ms)
            if lease_id is None and request.wait_ms > 0:
                value, lease_id = await self.store.wait_for_answer(
                    key, timeout_s=_wait_s(request.wait_ms, context), lease_ms=request.lease_ms)
                if value is not None:
                    return self._hit(value, shared=True)
        except StoreUnavailable as exc:
            await self._unavailable(exc, context)
        if lease_id is not None:
            self.counters.num_leases += 1
            return cache_pb2.CacheLookupResponse(lease_id=lease_id)
        self.counters.num_misses += 1
        return cache_pb2.CacheLookupResponse()

    async def Store(self, request: cache_pb2.CacheStoreRequest,
                    context: grpc.aio.ServicerContext) -> cache_pb2.CacheStoreResponse:
        key = await self._key(request.key, context)
        if request.ttl_s < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ttl_s must be >= 0")
        stored = False
        try:
            if request.answer.finish_reason in CACHEABLE:
                stored = await self.store.put(key, request.answer.SerializeToString(),
                                              ttl_s=request.ttl_s)
            # After the put, so that the lease's waiters find the answer when they wake.
            if request.lease_id:
                await self.store.release_lease(key, request.lease_id)
        except StoreUnavailable as exc:
            await self._unavailable(exc, context)
        self.counters.num_stores += stored
        return cache_pb2.CacheStoreResponse(stored=stored)

    async def Release(self, request: cache_pb2.ReleaseRequest,
                      context: grpc.aio.ServicerContext) -> cache_pb2.ReleaseResponse:
        key = await self._key(request.key, context)
        if not request.lease_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "lease_id is empty")
        try:
            await self.store.release_lease(key, request.lease_id)
        except StoreUnavailable as exc:
            await self._unavailable(exc, context)
        return cache_pb2.ReleaseResponse()

    async def Invalidate(self, request: cache_pb2.InvalidateRequest,
                         context: grpc.aio.ServicerContext) -> cache_pb2.InvalidateResponse:
        if not request.tenant and not request.model_version:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "set tenant, model_version or both")
        try:
            num_removed = await self.store.invalidate(tenant=request.tenant or None,
                                                      version=request.model_version or None)
        except StoreUnavailable as exc:
            await self._unavailable(exc, context)
        return cache_pb2.InvalidateResponse(num_removed=num_removed)

    async def GetStats(self, request: cache_pb2.CacheStatsRequest,
                       context: grpc.aio.ServicerContext) -> cache_pb2.CacheStats:
        c = self.counters
        stats = cache_pb2.CacheStats(
            store=self.store.name, num_lookups=c.num_lookups, num_hits=c.num_hits,
            num_shared=c.num_shared, num_leases=c.num_leases, num_stores=c.num_stores,
            num_evictions=self.store.counters.num_evictions,
            num_store_errors=c.num_store_errors)
        try:
            stats.num_entries = await self.store.num_entries()
            stats.num_bytes = await self.store.num_bytes()
        except StoreUnavailable:
            self.counters.num_store_errors += 1  # the counters above are still worth having
        return stats

    async def publish_metrics(self, every_s: float = 0.5) -> None:
        """Keep the Prometheus series current with the counts, until cancelled."""
        while True:
            c = self.counters
            for result, total in (("hit", c.num_hits - c.num_shared), ("shared", c.num_shared),
                                  ("lease", c.num_leases), ("miss", c.num_misses)):
                metrics.LOOKUPS[result].follow(total)
            metrics.STORES.follow(c.num_stores)
            metrics.STORE_ERRORS.follow(c.num_store_errors)
            metrics.EVICTIONS.follow(self.store.counters.num_evictions)
            try:
                metrics.ENTRIES.set(await self.store.num_entries())
                metrics.BYTES.set(await self.store.num_bytes())
            except StoreUnavailable:
                pass  # the lookups count the outage; the gauges keep their last value
            await asyncio.sleep(every_s)

    def _hit(self, value: bytes, *, shared: bool) -> cache_pb2.CacheLookupResponse:
        self.counters.num_hits += 1
        self.counters.num_shared += shared
        return cache_pb2.CacheLookupResponse(hit=True, shared=shared,
                                             answer=cache_pb2.CachedAnswer.FromString(value))

    async def _key(self, key: cache_pb2.CacheKey, context: grpc.aio.ServicerContext
                   ) -> EntryKey:
        try:
            return entry_key(key)
        except BadKeyError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # unreachable: abort raises

    async def _unavailable(self, exc: StoreUnavailable, context: grpc.aio.ServicerContext
                           ) -> None:
        self.counters.num_store_errors += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            f"the cache store is unavailable ({exc}); bypass the cache")


def _wait_s(wait_ms: int, context: grpc.aio.ServicerContext) -> float:
    """The single-flight wait: what the caller asked, within its own deadline."""
    remaining = context.time_remaining()
    wait_s = wait_ms / 1e3
    return wait_s if remaining is None else max(0.0, min(wait_s, remaining - 0.05))
