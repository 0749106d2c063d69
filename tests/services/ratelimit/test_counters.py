"""Counters in a real redis-server: the key scheme, expiry, one round trip, the clock."""

from __future__ import annotations

import asyncio

import pytest
import redis

from services.ratelimit.counters import (
    CountersUnavailableError,
    Hit,
    RedisCounters,
    WindowCount,
    counter_name,
)
from services.ratelimit.limits import Unit
from tests.services.ratelimit.conftest import T0

MINUTE_START = 1_767_225_600  # the minute, hour and day window T0 is in


def test_counter_names_escape_the_separators():
    assert (counter_name("genmesh", [("tenant", "alice")], Unit.MINUTE)
            == "genmesh:rl:genmesh:tenant=alice:minute")
    assert (counter_name("d", [("a", "1"), ("path", "/v1/x")], Unit.SECOND)
            == "genmesh:rl:d:a=1|path=/v1/x:second")
    # Without escaping, these two descriptors would share one counter.
    assert (counter_name("d", [("a", "1|b=2")], Unit.DAY)
            == "genmesh:rl:d:a=1%7Cb%3D2:day")
    assert (counter_name("d:x", [("k%", "v:w")], Unit.HOUR)
            == "genmesh:rl:d%3Ax:k%25=v%3Aw:hour")


def run_add(url: str, hits: list[Hit], clock=None) -> list[WindowCount]:
    async def main() -> list[WindowCount]:
        counters = RedisCounters.from_url(url, timeout_s=1.0, clock=clock)
        try:
            return await counters.add(hits)
        finally:
            await counters.close()
    return asyncio.run(main())


def test_counts_in_epoch_aligned_windows_with_expiry(redis_server):
    minute = counter_name("genmesh", [("tenant", "alice")], Unit.MINUTE)
    day = counter_name("genmesh", [("tenant", "bob")], Unit.DAY)
    hits = [Hit(minute, 60, 1), Hit(day, 86400, 5)]
    assert run_add(redis_server.url, hits, clock=lambda: T0) == [
        WindowCount(1, 50.0), WindowCount(5, 86390.0)]
    assert run_add(redis_server.url, hits, clock=lambda: T0 + 49.5) == [
        WindowCount(2, 0.5), WindowCount(10, 86340.5)]
    assert run_add(redis_server.url, hits, clock=lambda: T0 + 50) == [
        WindowCount(1, 60.0), WindowCount(15, 86340.0)]  # a new minute window

    db = redis.Redis(port=redis_server.port)
    assert sorted(db.keys("genmesh:rl:*")) == [
        b"genmesh:rl:genmesh:tenant=alice:minute:1767225600",
        b"genmesh:rl:genmesh:tenant=alice:minute:1767225660",
        b"genmesh:rl:genmesh:tenant=bob:day:1767225600"]
    assert db.get(f"{minute}:{MINUTE_START}") == b"2"
    # The expiry is set when a window's key is made: what is left of it, plus 1 s.
    assert 50 <= db.ttl(f"{minute}:{MINUTE_START}") <= 51
    assert 86390 <= db.ttl(f"{day}:{MINUTE_START}") <= 86391


def test_one_round_trip_for_all_descriptors(redis_server):
    names = [counter_name("d", [("k", str(n))], Unit.HOUR) for n in range(3)]

    async def main() -> None:
        counters = RedisCounters.from_url(redis_server.url, timeout_s=1.0)
        await counters.add([Hit("genmesh:rl:d:warm=up:hour", 3600, 1)])  # loads the script
        await counters.redis.config_resetstat()
        await counters.add([Hit(name, 3600, 1) for name in names])
        stats = await counters.redis.info("commandstats")
        await counters.close()
        commands = {name: s["calls"] for name, s in stats.items()}
        assert commands == {"cmdstat_evalsha": 1, "cmdstat_time": 1, "cmdstat_incrby": 3,
                            "cmdstat_expire": 3, "cmdstat_config": 1}
    asyncio.run(main())


def test_the_window_comes_from_the_redis_clock(redis_server):
    """Without a clock given, the window is the Redis server's current one (so replicas
    with different clocks agree)."""
    name = counter_name("d", [("k", "v")], Unit.SECOND)
    seconds, _ = redis.Redis(port=redis_server.port).time()
    [window] = run_add(redis_server.url, [Hit(name, 1, 1)])
    assert 0 < window.reset_s <= 1
    assert window.num_hits == 1
    keys = redis.Redis(port=redis_server.port).keys(f"{name}:*")
    # The key's window is the server's second (or the next, if one passed meanwhile).
    [start] = [int(key.rsplit(b":", 1)[1]) for key in keys]
    assert start in (seconds, seconds + 1)


def test_redis_down_is_unavailable(redis_server):
    redis_server.kill()
    with pytest.raises(CountersUnavailableError, match=r"Redis at 127\.0\.0\.1:\d+/0"):
        run_add(redis_server.url, [Hit("genmesh:rl:d:k=v:second", 1, 1)])
