"""Where the response cache keeps finished answers: the store's contract and the types
every store shares. ``memory_store.MemoryStore`` serves a single cache process when no
Redis is configured; ``redis_store.RedisStore`` lets every cache replica share one store.
Both behave the same.

An answer is opaque bytes (a serialized ``CachedAnswer``) under an ``EntryKey``: the
tenant, the model version, and a digest of everything else that determines it.

Why leases: identical deterministic requests that arrive together would otherwise all
generate the same answer. The first to miss takes a lease on the key and generates; the
others ``wait_for_answer`` until the value appears. A lease expires on its own, so a
holder that dies only delays its waiters; when it is released or expires, exactly one
waiter takes it over (Redis ``SET NX``; in memory, a check-and-take with no ``await``
in between) and the rest keep waiting for that one's answer.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class EntryKey:
    tenant: str  # may be empty; any characters
    version: str  # the model version, e.g. "v1"; any characters
    digest: str  # hex digest of everything else that determines the answer (the caller's)


@dataclass(frozen=True, slots=True)
class StoreLimits:
    max_bytes: int = 256 * 2**20  # total value bytes kept; past it, LRU entries are evicted
    max_entry_bytes: int = 4 * 2**20  # a larger value is not stored (put returns False)
    default_ttl_s: int = 3600  # used when put gets ttl_s <= 0
    default_lease_ms: int = 30_000  # used when acquire_lease gets lease_ms <= 0

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_entry_bytes", "default_ttl_s", "default_lease_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_entry_bytes > self.max_bytes:
            raise ValueError(f"max_entry_bytes ({self.max_entry_bytes}) must not exceed "
                             f"max_bytes ({self.max_bytes})")


class StoreUnavailable(Exception):
    """The store is down or slower than its timeout; the message says which and why."""


@dataclass(slots=True)
class StoreCounters:  # since the store was made
    num_evictions: int = 0  # live entries dropped to fit max_bytes (not expired ones)


class AnswerStore(Protocol):
    name: str  # "memory" or "redis"
    counters: StoreCounters

    async def get(self, key: EntryKey) -> bytes | None:
        """The value, or None if missing or expired; a hit makes it most recently used."""

    async def put(self, key: EntryKey, value: bytes, *, ttl_s: int = 0) -> bool:
        """Stores value (evicting LRU entries past max_bytes); False only when too large."""

    async def invalidate(self, *, tenant: str | None = None, version: str | None = None
                         ) -> int:
        """Removes the entries matching every given field; returns how many were live."""

    async def acquire_lease(self, key: EntryKey, *, lease_ms: int = 0) -> str | None:
        """A new lease id, or None while someone holds an unexpired lease on key."""

    async def release_lease(self, key: EntryKey, lease_id: str) -> None:
        """Frees the lease if lease_id still holds it; otherwise does nothing."""

    async def wait_for_answer(self, key: EntryKey, *, timeout_s: float, lease_ms: int = 0
                              ) -> tuple[bytes | None, str | None]:
        """(value, None) once stored; (None, lease id) if the lease came free and this
        caller took it (for ``lease_ms``, or the default); (None, None) after timeout_s."""

    async def num_entries(self) -> int: ...

    async def num_bytes(self) -> int:
        """Value bytes currently counted against max_bytes."""

    async def close(self) -> None: ...


def new_lease_id() -> str:
    return secrets.token_hex(16)


def check_invalidate_args(tenant: str | None, version: str | None) -> None:
    if tenant is None and version is None:
        raise ValueError("invalidate needs a tenant, a version, or both")
