"""The answer stores, memory and Redis (a real redis-server), held to the same behaviour:
hits and misses, TTL, LRU eviction by bytes, invalidation, leases and single flight; and
the Redis store failing fast when Redis dies or hangs, and working again once it is back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import pytest

from services.cache.memory_store import MemoryStore
from services.cache.redis_store import RedisStore, redis_store
from services.cache.store import AnswerStore, EntryKey, StoreLimits, StoreUnavailable
from tests.procs import RedisServer

TIMEOUT_S = 0.25  # the Redis client's socket and connect timeouts in these tests
SMALL = StoreLimits(max_bytes=100, max_entry_bytes=40)


def key(digest: str, *, tenant: str = "acme", version: str = "v1") -> EntryKey:
    return EntryKey(tenant=tenant, version=version, digest=digest)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Harness:
    store: AnswerStore
    # Lets the store's time pass: moves the memory store's clock, or sleeps for Redis.
    advance: Callable[[float], Awaitable[None]]


OpenStore = Callable[..., AbstractAsyncContextManager[Harness]]


@pytest.fixture(params=["memory", "redis"])
def open_store(request: pytest.FixtureRequest) -> OpenStore:
    """Opens a fresh store of each kind; Redis ones on a redis-server of the test's own."""
    server: RedisServer | None = None
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")

    @asynccontextmanager
    async def open_(limits: StoreLimits | None = None) -> AsyncIterator[Harness]:
        limits = limits or StoreLimits()
        store: AnswerStore
        advance: Callable[[float], Awaitable[None]]
        if server is None:
            clock = FakeClock()
            store = MemoryStore(limits, clock=clock)

            async def move_clock(seconds: float) -> None:
                clock.now += seconds
                await asyncio.sleep(0)

            advance = move_clock
        else:
            store = redis_store(server.url, limits, timeout_s=TIMEOUT_S)
            advance = asyncio.sleep
        try:
            yield Harness(store, advance)
        finally:
            await store.close()

    return open_


def test_a_miss_then_a_hit_and_overwrites_recount_bytes(open_store: OpenStore):
    async def main() -> None:
        async with open_store() as h:
            assert await h.store.get(key("a")) is None
            assert await h.store.put(key("a"), b"answer a")
            assert await h.store.get(key("a")) == b"answer a"
            assert await h.store.get(key("a", version="v2")) is None
            assert await h.store.put(key("empty"), b"")
            assert await h.store.get(key("empty")) == b""
            assert (await h.store.num_entries(), await h.store.num_bytes()) == (2, 8)
            assert await h.store.put(key("a"), b"much longer answer")
            assert await h.store.get(key("a")) == b"much longer answer"
            assert (await h.store.num_entries(), await h.store.num_bytes()) == (2, 18)

    asyncio.run(main())


def test_entries_expire_after_their_ttl_and_stop_counting(open_store: OpenStore):
    async def main() -> None:
        async with open_store() as h:
            assert await h.store.put(key("short"), b"12345", ttl_s=1)
            assert await h.store.put(key("unread"), b"123", ttl_s=1)
            assert await h.store.put(key("long"), b"1234567")  # the default: an hour
            await h.advance(1.1)
            assert await h.store.get(key("short")) is None
            assert await h.store.get(key("long")) == b"1234567"
            # "unread" was never looked up again, yet it no longer counts.
            assert (await h.store.num_entries(), await h.store.num_bytes()) == (1, 7)
            assert h.store.counters.num_evictions == 0

    asyncio.run(main())


def test_past_max_bytes_the_least_recently_read_entries_go_first(open_store: OpenStore):
    async def main() -> None:
        async with open_store(SMALL) as h:
            for name in "abc":
                assert await h.store.put(key(name), name.encode() * 30)
            assert await h.store.get(key("a")) is not None  # a is now newer than b and c
            assert await h.store.put(key("d"), b"d" * 30)  # 120 > 100: b goes
            assert await h.store.get(key("b")) is None
            assert h.store.counters.num_evictions == 1
            assert (await h.store.num_entries(), await h.store.num_bytes()) == (3, 90)
            for name in "acd":  # read in this order: a is now the oldest
                assert await h.store.get(key(name)) == name.encode() * 30
            assert await h.store.put(key("e"), b"e" * 40)  # 130 > 100: a goes, then it fits
            assert [await h.store.get(key(n)) is not None for n in "acde"] == [
                False, True, True, True]
            assert h.store.counters.num_evictions == 2
            assert (await h.store.num_entries(), await h.store.num_bytes()) == (3, 100)

    asyncio.run(main())


def test_a_value_over_max_entry_bytes_is_refused(open_store: OpenStore):
    async def main() -> None:
        async with open_store(SMALL) as h:
            assert await h.store.put(key("a"), b"x" * 40)
            assert not await h.store.put(key("b"), b"x" * 41)
            assert await h.store.get(key("b")) is None
            assert (await h.store.num_entries(), await h.store.num_bytes()) == (1, 40)

    asyncio.run(main())


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_entry_bytes"):
        StoreLimits(max_bytes=10, max_entry_bytes=11)
    with pytest.raises(ValueError, match="default_ttl_s must be positive"):
        StoreLimits(default_ttl_s=0)


def test_invalidate_by_tenant_by_version_and_by_both(open_store: OpenStore):
    async def main() -> None:
        async with open_store() as h:
            for tenant in ("acme", "beta"):
                for version in ("v1", "v2"):
                    for digest in ("d1", "d2"):
                        assert await h.store.put(key(digest, tenant=tenant, version=version),
                                                 f"{tenant}/{version}/{digest}".encode())
            assert await h.store.invalidate(tenant="acme", version="v1") == 2
            assert await h.store.get(key("d1", tenant="acme", version="v1")) is None
            assert await h.store.get(key("d1", tenant="acme", version="v2")) is not None
            assert await h.store.invalidate(version="v2") == 4
            assert await h.store.invalidate(version="v2") == 0
            assert await h.store.get(key("d2", tenant="beta", version="v1")) == b"beta/v1/d2"
            assert await h.store.invalidate(tenant="beta") == 2
            assert (await h.store.num_entries(), await h.store.num_bytes()) == (0, 0)
            with pytest.raises(ValueError, match="needs a tenant, a version, or both"):
                await h.store.invalidate()

    asyncio.run(main())


def test_tenants_and_versions_with_glob_and_separator_characters_stay_apart(
        open_store: OpenStore):
    tenants = ["a", "a:b", "a:*", "*", "[a]", "a[", "?", "\\", "", "é"]

    async def main() -> None:
        async with open_store() as h:
            for tenant in tenants:
                assert await h.store.put(key("d", tenant=tenant), tenant.encode() or b"-")
            # "v" is hex 76: a loose "*:76:*" pattern would also match this key.
            assert await h.store.put(key("x:76:y", tenant="t"), b"t")
            assert await h.store.put(key("d", tenant="a", version="v:*"), b"a v:*")
            for tenant in tenants:
                assert await h.store.get(key("d", tenant=tenant)) == (tenant.encode() or b"-")
            assert await h.store.invalidate(version="v") == 0
            assert await h.store.invalidate(tenant="*") == 1
            assert await h.store.invalidate(tenant="a") == 2  # v1 and v:*
            assert await h.store.invalidate(tenant="") == 1
            assert await h.store.invalidate(tenant="[a]", version="v1") == 1
            assert await h.store.get(key("d", tenant="a:*")) == b"a:*"
            assert await h.store.get(key("d", tenant="a[")) == b"a["
            assert await h.store.get(key("x:76:y", tenant="t")) == b"t"
            assert await h.store.num_entries() == len(tenants) + 2 - 5

    asyncio.run(main())


def test_a_lease_is_held_once_freed_only_by_its_id_and_expires(open_store: OpenStore):
    async def main() -> None:
        async with open_store() as h:
            lease_id = await h.store.acquire_lease(key("a"))
            assert lease_id
            assert await h.store.acquire_lease(key("a")) is None
            assert await h.store.acquire_lease(key("b")) is not None  # another key
            await h.store.release_lease(key("a"), "not-the-holder")
            assert await h.store.acquire_lease(key("a")) is None
            await h.store.release_lease(key("a"), lease_id)
            short_id = await h.store.acquire_lease(key("a"), lease_ms=200)
            assert short_id is not None and short_id != lease_id
            await h.advance(0.25)
            late_id = await h.store.acquire_lease(key("a"))
            assert late_id not in (None, short_id)
            await h.store.release_lease(key("a"), short_id)  # expired: frees nothing
            assert await h.store.acquire_lease(key("a")) is None

    asyncio.run(main())


def test_twenty_waiters_get_the_value_the_lease_holder_stores(open_store: OpenStore):
    async def main() -> None:
        async with open_store() as h:
            lease_id = await h.store.acquire_lease(key("a"))
            assert lease_id is not None
            waiters = [asyncio.create_task(h.store.wait_for_answer(key("a"), timeout_s=5))
                       for _ in range(20)]
            await asyncio.sleep(0.05)
            assert not any(w.done() for w in waiters)
            assert await h.store.put(key("a"), b"the answer")
            await h.store.release_lease(key("a"), lease_id)
            assert await asyncio.gather(*waiters) == [(b"the answer", None)] * 20

    asyncio.run(main())


def test_after_a_release_exactly_one_waiter_takes_the_lease(open_store: OpenStore):
    async def main() -> None:
        async with open_store() as h:
            lease_id = await h.store.acquire_lease(key("a"))
            assert lease_id is not None
            waiters = [asyncio.create_task(h.store.wait_for_answer(key("a"), timeout_s=5))
                       for _ in range(20)]
            await asyncio.sleep(0.05)
            await h.store.release_lease(key("a"), lease_id)  # the generation failed
            done, _ = await asyncio.wait(waiters, timeout=2,
                                         return_when=asyncio.FIRST_COMPLETED)
            await asyncio.sleep(0.05)  # long enough for a second taker to show up
            assert len(done) == 1 and sum(w.done() for w in waiters) == 1
            value, new_lease_id = done.pop().result()
            assert value is None and new_lease_id not in (None, lease_id)
            assert await h.store.acquire_lease(key("a")) is None  # it is held
            assert await h.store.put(key("a"), b"second try")
            results = await asyncio.gather(*waiters)
            assert sorted(results, key=repr) == sorted(
                [(None, new_lease_id)] + [(b"second try", None)] * 19, key=repr)

    asyncio.run(main())


def test_an_expired_lease_passes_to_a_waiter(open_store: OpenStore):
    async def main() -> None:
        async with open_store() as h:
            assert await h.store.acquire_lease(key("a"), lease_ms=200)  # its holder died
            waiter = asyncio.create_task(h.store.wait_for_answer(key("a"), timeout_s=5))
            await asyncio.sleep(0.05)
            assert not waiter.done()
            await h.advance(0.25)
            value, lease_id = await asyncio.wait_for(waiter, timeout=1)
            assert value is None and lease_id is not None

    asyncio.run(main())


def test_a_waiter_gives_up_within_its_timeout(open_store: OpenStore):
    async def main() -> None:
        async with open_store() as h:
            assert await h.store.acquire_lease(key("a"))
            t0 = time.monotonic()
            assert await h.store.wait_for_answer(key("a"), timeout_s=0.2) == (None, None)
            assert 0.2 <= time.monotonic() - t0 < 0.2 + 0.02 + 0.05
            t0 = time.monotonic()
            assert await h.store.wait_for_answer(key("a"), timeout_s=0) == (None, None)
            assert time.monotonic() - t0 < 0.05

    asyncio.run(main())


def every_call(store: RedisStore) -> dict[str, Callable[[], Awaitable[object]]]:
    return {
        "get": lambda: store.get(key("a")),
        "put": lambda: store.put(key("a"), b"x"),
        "invalidate": lambda: store.invalidate(tenant="acme"),
        "acquire_lease": lambda: store.acquire_lease(key("a")),
        "release_lease": lambda: store.release_lease(key("a"), "id"),
        "wait_for_answer": lambda: store.wait_for_answer(key("a"), timeout_s=5),
        "num_entries": store.num_entries,
        "num_bytes": store.num_bytes,
    }


async def assert_every_call_fails_fast(store: RedisStore, *, max_s: float) -> None:
    for name, call in every_call(store).items():
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="redis cache store failed on"):
            await call()
        assert time.monotonic() - t0 < max_s, name


def test_a_dead_redis_fails_every_call_fast_and_a_restarted_one_works_again(
        redis_server: RedisServer):
    async def main() -> None:
        store = redis_store(redis_server.url, StoreLimits(), timeout_s=TIMEOUT_S)
        try:
            assert await store.put(key("a"), b"before")
            redis_server.kill()
            await assert_every_call_fails_fast(store, max_s=1.0)
            redis_server.start()  # same port, empty: no data, no cached scripts
            assert await store.get(key("a")) is None
            assert await store.put(key("a"), b"after")
            assert await store.get(key("a")) == b"after"
            assert (await store.num_entries(), await store.num_bytes()) == (1, 5)
        finally:
            await store.close()

    asyncio.run(main())


def test_a_hung_redis_fails_within_the_timeout_and_recovers(redis_server: RedisServer):
    async def main() -> None:
        store = redis_store(redis_server.url, StoreLimits(), timeout_s=TIMEOUT_S)
        try:
            assert await store.put(key("a"), b"kept")
            redis_server.pause()
            try:
                await assert_every_call_fails_fast(store, max_s=2 * TIMEOUT_S + 0.1)
            finally:
                redis_server.resume()
            assert await store.get(key("a")) == b"kept"
            assert await store.acquire_lease(key("a")) is not None
        finally:
            await store.close()

    asyncio.run(main())
