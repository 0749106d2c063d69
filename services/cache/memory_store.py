"""The answer store in process memory: an LRU map with TTLs and a byte cap, and
single-flight leases whose waiters an ``asyncio.Event`` per key wakes (see ``store.py``)."""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from services.cache.store import (
    EntryKey,
    StoreCounters,
    StoreLimits,
    check_invalidate_args,
    new_lease_id,
)

_MAX_RECHECK_S = 0.05  # a waiter rechecks at least this often (an injected clock)


@dataclass(slots=True)
class _Entry:
    value: bytes
    expires_at: float  # by the store's clock
    seq: int  # which put stored it: tells a stale expiry-heap item from a current one


@dataclass(slots=True)
class _Lease:
    lease_id: str
    expires_at: float  # by the store's clock


@dataclass(slots=True)
class _Waiters:
    changed: asyncio.Event  # set (and replaced) when key gets a value or its lease is freed
    num_waiters: int = 0  # waiting on it now; the last one out forgets it


class MemoryStore:
    """In-process store: an OrderedDict in LRU order (oldest first), bounded by bytes.
    No await happens inside an operation, so each is atomic on its event loop."""

    name = "memory"

    def __init__(self, limits: StoreLimits, *, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.limits = limits
        self.counters = StoreCounters()
        self._clock = clock  # TTL and lease expiry; waiting timeouts use the event loop's
        self._entries: OrderedDict[EntryKey, _Entry] = OrderedDict()
        self._num_bytes = 0
        # (expires_at, seq, key) per put; items whose seq no longer matches are stale.
        self._expiries: list[tuple[float, int, EntryKey]] = []
        self._num_puts = 0
        self._leases: dict[EntryKey, _Lease] = {}
        self._max_num_leases = 1024  # sweep expired leases when there are more than this
        self._waiters: dict[EntryKey, _Waiters] = {}

    async def get(self, key: EntryKey) -> bytes | None:
        return self._get(key)

    async def put(self, key: EntryKey, value: bytes, *, ttl_s: int = 0) -> bool:
        if len(value) > self.limits.max_entry_bytes:
            return False
        self._purge_expired()
        self._forget(key)
        self._num_puts += 1
        expires_at = self._clock() + (ttl_s if ttl_s > 0 else self.limits.default_ttl_s)
        self._entries[key] = _Entry(value, expires_at, self._num_puts)
        self._num_bytes += len(value)
        heapq.heappush(self._expiries, (expires_at, self._num_puts, key))
        while self._num_bytes > self.limits.max_bytes:
            oldest = next(iter(self._entries))  # never key itself: it fits on its own
            self._forget(oldest)
            self.counters.num_evictions += 1
        self._wake(key)
        return True

    async def invalidate(self, *, tenant: str | None = None, version: str | None = None
                         ) -> int:
        check_invalidate_args(tenant, version)
        now = self._clock()
        matching = [k for k in self._entries
                    if (tenant is None or k.tenant == tenant)
                    and (version is None or k.version == version)]
        num_live = sum(self._entries[k].expires_at > now for k in matching)
        for k in matching:
            self._forget(k)
        return num_live

    async def acquire_lease(self, key: EntryKey, *, lease_ms: int = 0) -> str | None:
        return self._acquire(key, lease_ms)

    async def release_lease(self, key: EntryKey, lease_id: str) -> None:
        lease = self._leases.get(key)
        if lease is not None and lease.lease_id == lease_id:
            del self._leases[key]
            self._wake(key)

    async def wait_for_answer(self, key: EntryKey, *, timeout_s: float, lease_ms: int = 0
                              ) -> tuple[bytes | None, str | None]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            value = self._get(key)
            if value is not None:
                return value, None
            lease_id = self._acquire(key, lease_ms)
            if lease_id is not None:
                return None, lease_id
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None, None
            # Nothing signals a lease's expiry, so wake by then at the latest; the cap
            # covers an injected clock that moves faster than real time.
            lease_left = self._leases[key].expires_at - self._clock()
            await self._wait_changed(key, min(remaining, lease_left, _MAX_RECHECK_S))

    async def num_entries(self) -> int:
        self._purge_expired()
        return len(self._entries)

    async def num_bytes(self) -> int:
        self._purge_expired()
        return self._num_bytes

    async def close(self) -> None:
        self._entries.clear()
        self._expiries.clear()
        self._leases.clear()
        self._num_bytes = 0

    def _get(self, key: EntryKey) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            self._forget(key)
            return None
        self._entries.move_to_end(key)
        return entry.value

    def _forget(self, key: EntryKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._num_bytes -= len(entry.value)

    def _purge_expired(self) -> None:
        now = self._clock()
        while self._expiries and self._expiries[0][0] <= now:
            _, seq, key = heapq.heappop(self._expiries)
            entry = self._entries.get(key)
            if entry is not None and entry.seq == seq:
                self._forget(key)
        # Overwritten, evicted and invalidated entries leave stale items behind.
        if len(self._expiries) > 2 * len(self._entries) + 64:
            self._expiries = [(e.expires_at, e.seq, k) for k, e in self._entries.items()]
            heapq.heapify(self._expiries)

    def _acquire(self, key: EntryKey, lease_ms: int) -> str | None:
        now = self._clock()
        lease = self._leases.get(key)
        if lease is not None and lease.expires_at > now:
            return None
        if len(self._leases) > self._max_num_leases:  # holders that died never release
            self._leases = {k: v for k, v in self._leases.items() if v.expires_at > now}
            self._max_num_leases = max(1024, 2 * len(self._leases))
        lease_id = new_lease_id()
        lease_s = (lease_ms if lease_ms > 0 else self.limits.default_lease_ms) / 1e3
        self._leases[key] = _Lease(lease_id, now + lease_s)
        return lease_id

    def _wake(self, key: EntryKey) -> None:
        waiters = self._waiters.pop(key, None)
        if waiters is not None:
            waiters.changed.set()

    async def _wait_changed(self, key: EntryKey, timeout_s: float) -> None:
        waiters = self._waiters.get(key)
        if waiters is None:
            waiters = self._waiters[key] = _Waiters(asyncio.Event())
        waiters.num_waiters += 1
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                await waiters.changed.wait()
        except TimeoutError:
            pass
        finally:
            waiters.num_waiters -= 1
            if waiters.num_waiters == 0 and self._waiters.get(key) is waiters:
                del self._waiters[key]
