"""Hit counters in Redis, in fixed windows aligned to the Unix epoch.

The window is chosen by the Redis server's clock (TIME, read inside the counting
script), so every replica of the service counts in the same windows whatever its own
clock says. One request's counters are all added by one script call: one round trip,
atomic, with each new window's expiry set in the same step.

A counter's key is ``genmesh:rl:<domain>:<k1>=<v1>|<k2>=<v2>:<unit>:<window start>``,
e.g. ``genmesh:rl:genmesh:tenant=alice:minute:1767225600`` (window start in Unix
seconds; ``%``, ``:``, ``|`` and ``=`` inside a domain, key or value are percent-encoded
so that two descriptors never share a key). The script builds the window's key from
the name it is passed, so it needs a single Redis, not a cluster.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from services.ratelimit.limits import Unit

log = logging.getLogger("genmesh.ratelimit")
T = TypeVar("T")

KEY_PREFIX = "genmesh:rl"

# KEYS[i]: a counter's name (without its window). ARGV[1]: the time in microseconds
# since the epoch, or "" for the server's clock. ARGV[2i], ARGV[2i+1]: KEYS[i]'s window
# length in seconds and the hits to add. Returns {time in microseconds, count 1, ...}.
ADD_HITS_LUA = """
local now_us
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now_us = tonumber(ARGV[1])
end
local now_s = math.floor(now_us / 1000000)
local reply = {now_us}
for i, name in ipairs(KEYS) do
  local window_s = tonumber(ARGV[2 * i])
  local hits = tonumber(ARGV[2 * i + 1])
  local start = now_s - now_s % window_s
  local key = name .. ':' .. start
  local count = redis.call('INCRBY', key, hits)
  if count == hits then
    redis.call('EXPIRE', key, start + window_s - now_s + 1)
  end
  reply[i + 1] = count
end
return reply
"""


def counter_name(domain: str, entries: Sequence[tuple[str, str]], unit: Unit) -> str:
    """The key of a descriptor's counter for ``unit``, without the window start."""
    pairs = "|".join(f"{_escape(key)}={_escape(value)}" for key, value in entries)
    return f"{KEY_PREFIX}:{_escape(domain)}:{pairs}:{unit.name.lower()}"


def _until_window_end(now_us: int, window_s: int) -> float:
    """Seconds from ``now_us`` to the end of its window (windows start at multiples of
    ``window_s`` since the epoch, as in the script)."""
    window_us = window_s * 1_000_000
    return (window_us - now_us % window_us) / 1_000_000


def _escape(text: str) -> str:
    return (text.replace("%", "%25").replace(":", "%3A").replace("|", "%7C")
            .replace("=", "%3D"))


@dataclass(frozen=True, slots=True)
class Hit:
    counter: str  # the counter's name (counter_name)
    window_s: int  # the window's length: the limit's unit in seconds
    num_hits: int  # added to the count; at least 1


@dataclass(frozen=True, slots=True)
class WindowCount:
    num_hits: int  # hits in the current window, this request's included
    reset_s: float  # seconds until the window ends and the count restarts from 0


class CountersUnavailableError(Exception):
    """Redis did not answer in time, or refused the connection or the command."""


class RedisCounters:
    """The only owner of the rate-limit counters. Every call is bounded by
    ``timeout_s`` (connecting included): a slow answer is a failed call, which Envoy's
    failure mode settles. A lost connection is retried once, at once, within that bound,
    so the first call after Redis restarts does not fail on the dead pooled connection
    (if Redis had run the command before the connection dropped, those hits count twice).
    """

    def __init__(self, redis: Redis, *, timeout_s: float,
                 clock: Callable[[], float] | None = None) -> None:
        """``clock``: Unix seconds to count at instead of the Redis server's clock, for
        tests; None (the default) uses the server's clock."""
        self.redis = redis
        self.timeout_s = timeout_s
        self._clock = clock
        self._add_hits = redis.register_script(ADD_HITS_LUA)
        self.is_available = True  # the last call succeeded (logs only the changes)

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float,
                 clock: Callable[[], float] | None = None) -> RedisCounters:
        redis = Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                               retry=Retry(NoBackoff(), 1, (RedisConnectionError,)))
        return cls(redis, timeout_s=timeout_s, clock=clock)

    async def add(self, hits: Sequence[Hit]) -> list[WindowCount]:
        """Adds the hits to their counters' current windows; the counts after adding,
        in order. Raises CountersUnavailableError."""
        if not hits:
            return []
        now = "" if self._clock is None else str(round(self._clock() * 1_000_000))
        args = [now, *(str(n) for hit in hits for n in (hit.window_s, hit.num_hits))]
        reply = await self._call(
            lambda: self._add_hits(keys=[hit.counter for hit in hits], args=args))
        now_us, counts = int(reply[0]), [int(c) for c in reply[1:]]
        return [WindowCount(count, _until_window_end(now_us, hit.window_s))
                for hit, count in zip(hits, counts, strict=True)]

    async def ping(self) -> None:
        """Raises CountersUnavailableError unless Redis answers."""
        await self._call(self.redis.ping)

    async def close(self) -> None:
        await self.redis.aclose()

    async def _call(self, command: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await command()
        except (RedisError, OSError, TimeoutError) as exc:
            # asyncio's timeout says nothing; Redis's errors say what went wrong.
            reason = str(exc) or f"no answer within {self.timeout_s} s"
            if self.is_available:
                log.warning("redis unavailable", extra={"redis": self.where, "error": reason})
            self.is_available = False
            raise CountersUnavailableError(
                f"rate-limit counters unavailable (Redis at {self.where}): {reason}") from exc
        if not self.is_available:
            log.info("redis available again", extra={"redis": self.where})
            self.is_available = True
        return result

    @property
    def where(self) -> str:
        """The Redis server, without credentials."""
        kwargs = self.redis.connection_pool.connection_kwargs
        if "path" in kwargs:
            return f"unix:{kwargs['path']}"
        host, port = kwargs.get("host", "localhost"), kwargs.get("port", 6379)
        return f"{host}:{port}/{kwargs.get('db', 0)}"
