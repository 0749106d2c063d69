"""The frontend's side of the response cache: which requests may be answered from it,
their keys, and calls that never fail a request.

Only deterministic requests are cached: greedy decoding, or sampling with an explicit
seed, and no logprobs (the cache keeps text, not probabilities). The key names the model
version that serves the request, so a rollout promote or rollback never replays the other
version's answers. Identical concurrent requests are coalesced (single flight): the
first one generates under a lease, the others wait for its answer and replay it.

The cache is an optimization: the service being down, slow or confused is logged (and a
lookup counted as ``bypass`` in ``genmesh_response_cache_requests_total``), and the
request goes on without it (fail-open). No call waits longer than its
timeout.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc

from genmesh.core.sampling import DEFAULT_MAX_TOKENS
from genmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2
from services.frontend import metrics

log = logging.getLogger("genmesh.frontend")


@dataclass(frozen=True, slots=True)
class CacheSettings:
    timeout_s: float = 0.25  # longest wait for a lookup, store or release (not the wait below)
    ttl_s: int = 0  # how long answers are kept; 0: the cache service's default
    # Longest wait for an identical request in flight, and the lease given to the one that
    # generates (capped by the caller's deadline).
    max_wait_s: float = 120.0


@dataclass(frozen=True, slots=True)
class Lookup:
    answer: cache_pb2.CachedAnswer | None = None  # a hit
    lease_id: str = ""  # a miss whose answer this request must store (or release)
    shared: bool = False  # the hit came from an identical request in flight


def is_cacheable(params: common_pb2.SamplingParams) -> bool:
    """Deterministic requests only: greedy, or sampled with a seed; no logprobs."""
    return ((params.temperature == 0 or params.HasField("seed")) and params.logprobs == 0
            and not params.return_logprobs)


def cache_key(*, tenant: str, model: str, version: str, prompt_ids: list[int],
              params: common_pb2.SamplingParams) -> cache_pb2.CacheKey:
    """The key of a request as it runs: defaults that change nothing are filled in, so
    ``max_tokens: 0`` and ``max_tokens: 128`` share answers."""
    normalized = common_pb2.SamplingParams()
    normalized.CopyFrom(params)
    normalized.max_tokens = params.max_tokens or DEFAULT_MAX_TOKENS
    normalized.ClearField("speculative")  # same tokens either way, sampled ones too
    if normalized.temperature == 0:
        normalized.ClearField("seed")  # greedy: the seed changes nothing
        normalized.top_k = normalized.top_p = normalized.min_p = 0
    return cache_pb2.CacheKey(tenant=tenant, model=model, model_version=version,
                              prompt_ids=prompt_ids, params=normalized)


@dataclass(slots=True)
class ResponseCache:
    stub: cache_pb2_grpc.CacheStub
    settings: CacheSettings
    # Releases still running after their request ended (kept so they are not collected).
    _pending: set[asyncio.Task[None]] = field(default_factory=set)

    async def lookup(self, key: cache_pb2.CacheKey, *, deadline_s: float) -> Lookup:
        """A hit, a lease, or a plain miss (also when the cache cannot be reached)."""
        wait_s = max(0.0, min(self.settings.max_wait_s, deadline_s))
        try:
            reply = await self.stub.Lookup(cache_pb2.LookupRequest(
                key=key, single_flight=True, wait_ms=int(wait_s * 1e3),
                lease_ms=int(wait_s * 1e3)), timeout=wait_s + self.settings.timeout_s)
        except grpc.aio.AioRpcError as exc:
            self._bypass("lookup", exc)
            metrics.RESPONSE_CACHE.labels("bypass").inc()
            return Lookup()
        if reply.hit:
            metrics.RESPONSE_CACHE.labels("shared" if reply.shared else "hit").inc()
            return Lookup(answer=reply.answer, shared=reply.shared)
        metrics.RESPONSE_CACHE.labels("miss").inc()
        return Lookup(lease_id=reply.lease_id)

    async def store(self, key: cache_pb2.CacheKey, answer: cache_pb2.CachedAnswer,
                    *, lease_id: str) -> None:
        try:
            await self.stub.Store(cache_pb2.CacheStoreRequest(
                key=key, answer=answer, ttl_s=self.settings.ttl_s, lease_id=lease_id),
                timeout=self.settings.timeout_s)
        except grpc.aio.AioRpcError as exc:
            self._bypass("store", exc)

    def release_soon(self, key: cache_pb2.CacheKey, lease_id: str) -> None:
        """Give the lease back in the background: the request that held it is ending
        (perhaps cancelled) and must not wait for this."""
        task = asyncio.ensure_future(self._release(key, lease_id))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _release(self, key: cache_pb2.CacheKey, lease_id: str) -> None:
        try:
            await self.stub.Release(cache_pb2.ReleaseRequest(key=key, lease_id=lease_id),
                                    timeout=self.settings.timeout_s)
        except grpc.aio.AioRpcError as exc:
            # The lease expires on its own; waiters then take it over.
            self._bypass("release", exc)

    def _bypass(self, what: str, exc: grpc.aio.AioRpcError) -> None:
        log.warning("response cache bypassed", extra={
            "call": what, "code": exc.code().name, "detail": exc.details()})
