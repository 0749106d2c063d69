"""The answer store on Redis, shared by every cache replica (see ``store.py`` for the
contract and why leases).

Why the encoded key layout: invalidation (rollout promote or rollback, tenant purge)
must find every entry of a tenant and/or version with ``SCAN MATCH``, and tenants may
contain ``:``, ``*`` or ``[``. Tenant and version are hex-encoded in the Redis key
(``<prefix>:e:<hex tenant>:<hex version>:<digest>``), so they hold no glob or separator
characters; the pattern only narrows the scan, and each key found is parsed and compared
exactly before it is deleted, whatever the digest contains.

How the cap is enforced: every stored value's size counts against ``max_bytes``. A put
that goes over it evicts least-recently-*used* entries (a get counts as use) until the
total fits again; a value over ``max_entry_bytes`` is refused, and ``max_entry_bytes <=
max_bytes``, so the new value always fits. In Redis the accounting is three structures
beside the values, kept by Lua scripts so each operation is atomic: a sorted set of keys
by last use (``lru``), one of keys by expiry time (``exp``), and a hash of sizes plus a
total (``sizes``, ``meta``). Entries that expired by TTL stop counting at the next put
or stats call (purged through ``exp``), or when a get finds them missing. The scripts
touch entry keys they find in those sets, so this needs one Redis, not Redis Cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.cache.store import (
    EntryKey,
    StoreCounters,
    StoreLimits,
    StoreUnavailable,
    check_invalidate_args,
    new_lease_id,
)

T = TypeVar("T")

_MIN_POLL_S, _MAX_POLL_S = 0.005, 0.02  # wait_for_answer polls, backing off
_MAX_NUM_PURGED = 1000  # expired entries a script forgets per call, to stay short
_SCAN_BATCH = 500  # entries per ZSCAN step and per delete during invalidation


# Shared by the scripts below. KEYS[1..4] are always lru, exp, sizes, meta:
#   lru: entry key -> tick of its last use (a counter in meta, so order is exact);
#   exp: entry key -> when it expires, in ms of Redis's clock;
#   sizes: entry key -> value bytes; meta: "bytes" (their total), "tick".
_PRELUDE_LUA = """
local lru, exp, sizes, meta = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local function forget(key)
  local size = tonumber(redis.call('HGET', sizes, key))
  if size then
    redis.call('HDEL', sizes, key)
    redis.call('HINCRBY', meta, 'bytes', -size)
  end
  redis.call('ZREM', lru, key)
  redis.call('ZREM', exp, key)
end
local function purge_expired(max_num)
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  for _, key in ipairs(redis.call('ZRANGEBYSCORE', exp, '-inf', now_ms, 'LIMIT', 0, max_num)) do
    redis.call('DEL', key)  -- gone already, or expiring this millisecond
    forget(key)
  end
  return now_ms
end
"""

# KEYS[5]: the entry. ARGV: value, ttl ms, max bytes, max purged. Returns the number of
# live entries evicted.
_PUT_LUA = _PRELUDE_LUA + """
local key = KEYS[5]
local now_ms = purge_expired(tonumber(ARGV[4]))
forget(key)
redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
redis.call('HSET', sizes, key, string.len(ARGV[1]))
local total = redis.call('HINCRBY', meta, 'bytes', string.len(ARGV[1]))
redis.call('ZADD', lru, redis.call('HINCRBY', meta, 'tick', 1), key)
redis.call('ZADD', exp, now_ms + tonumber(ARGV[2]), key)
local max_bytes, num_evicted = tonumber(ARGV[3]), 0
while total > max_bytes do
  local oldest = redis.call('ZRANGE', lru, 0, 0)[1]
  if not oldest or oldest == key then break end
  num_evicted = num_evicted + redis.call('DEL', oldest)
  forget(oldest)
  total = tonumber(redis.call('HGET', meta, 'bytes'))
end
return num_evicted
"""

# KEYS[5]: the entry; KEYS[6]: its lease. ARGV: lease id ('' for a plain get), lease ms.
# Returns the value (a hit, now most recently used); else 1 if the lease was taken, 0 if
# not. Taking the lease in the same script as the miss means a waiter never takes it
# over on a key whose value has just been stored.
_GET_LUA = _PRELUDE_LUA + """
local key = KEYS[5]
local value = redis.call('GET', key)
if value then
  redis.call('ZADD', lru, 'XX', redis.call('HINCRBY', meta, 'tick', 1), key)
  return value
end
forget(key)  -- expired (or evicted by Redis itself) but still counted
if ARGV[1] ~= '' and redis.call('SET', KEYS[6], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
"""

# KEYS[5..]: entries to remove. Returns how many of them were live.
_REMOVE_LUA = _PRELUDE_LUA + """
local num_removed = 0
for i = 5, #KEYS do
  num_removed = num_removed + redis.call('DEL', KEYS[i])
  forget(KEYS[i])
end
return num_removed
"""

# ARGV: max purged. Returns {number of entries, value bytes}.
_STATS_LUA = _PRELUDE_LUA + """
purge_expired(tonumber(ARGV[1]))
return {redis.call('ZCARD', lru), tonumber(redis.call('HGET', meta, 'bytes')) or 0}
"""

# KEYS[1]: a lease. ARGV[1]: the id that must still hold it.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def redis_store(url: str, limits: StoreLimits, *, timeout_s: float) -> RedisStore:
    """A RedisStore whose every call gives up after ``timeout_s`` (connect and reply),
    without retries: the cache is an optimization, and callers bypass it at once."""
    client = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                  socket_connect_timeout=timeout_s,
                                  retry=Retry(NoBackoff(), 0))
    return RedisStore(client, limits)


class RedisStore:
    """The store on one Redis, shared by every cache replica; the only owner of the keys
    under its prefix. The client must return bytes (no decode_responses)."""

    name = "redis"

    def __init__(self, client: redis.Redis, limits: StoreLimits, *,
                 prefix: str = "genmesh:cache") -> None:
        self.client = client
        self.limits = limits
        self.counters = StoreCounters()
        self.prefix = prefix
        self._index_keys = [f"{prefix}:{n}" for n in ("lru", "exp", "sizes", "meta")]
        self._put_script = client.register_script(_PUT_LUA)
        self._get_script = client.register_script(_GET_LUA)
        self._remove_script = client.register_script(_REMOVE_LUA)
        self._stats_script = client.register_script(_STATS_LUA)
        self._release_script = client.register_script(_RELEASE_LUA)
        # The client's own timeouts bound each call; this outer bound (a connect plus a
        # reply) only guards against a client built without them.
        kwargs = client.connection_pool.connection_kwargs
        self._socket_timeout_s = kwargs.get("socket_timeout") or 1.0
        self._timeout_s = self._socket_timeout_s + (
            kwargs.get("socket_connect_timeout") or self._socket_timeout_s)

    async def get(self, key: EntryKey) -> bytes | None:
        reply = await self._call("get", self._get_script(
            keys=[*self._index_keys, self._entry_key(key), self._lease_key(key)],
            args=["", 0]))
        return reply if isinstance(reply, bytes) else None

    async def put(self, key: EntryKey, value: bytes, *, ttl_s: int = 0) -> bool:
        if len(value) > self.limits.max_entry_bytes:
            return False
        ttl_ms = 1000 * (ttl_s if ttl_s > 0 else self.limits.default_ttl_s)
        num_evicted = await self._call("put", self._put_script(
            keys=[*self._index_keys, self._entry_key(key)],
            args=[value, ttl_ms, self.limits.max_bytes, _MAX_NUM_PURGED]))
        self.counters.num_evictions += int(num_evicted)
        return True

    async def invalidate(self, *, tenant: str | None = None, version: str | None = None
                         ) -> int:
        check_invalidate_args(tenant, version)
        entry_prefix = f"{self.prefix}:e:"
        tenant_hex = "*" if tenant is None else _hex(tenant)
        version_hex = "*" if version is None else _hex(version)
        pattern = f"{_glob_escape(entry_prefix)}{tenant_hex}:{version_hex}:*"
        num_removed, cursor = 0, 0
        while True:
            cursor, members = await self._call("invalidate", self.client.zscan(
                self._index_keys[0], cursor, match=pattern, count=_SCAN_BATCH))
            matching: list[str] = []
            for member, _ in members:
                entry_key = member.decode() if isinstance(member, bytes) else str(member)
                # The pattern's '*' may match across ':' inside the digest: compare exactly.
                fields = entry_key[len(entry_prefix):].split(":", 2)
                if (len(fields) == 3 and (tenant is None or fields[0] == _hex(tenant))
                        and (version is None or fields[1] == _hex(version))):
                    matching.append(entry_key)
            if matching:
                num_removed += int(await self._call("invalidate", self._remove_script(
                    keys=[*self._index_keys, *matching])))
            if int(cursor) == 0:
                return num_removed

    async def acquire_lease(self, key: EntryKey, *, lease_ms: int = 0) -> str | None:
        lease_id = new_lease_id()
        is_taken = await self._call("acquire_lease", self.client.set(
            self._lease_key(key), lease_id, nx=True,
            px=lease_ms if lease_ms > 0 else self.limits.default_lease_ms))
        return lease_id if is_taken else None

    async def release_lease(self, key: EntryKey, lease_id: str) -> None:
        await self._call("release_lease", self._release_script(
            keys=[self._lease_key(key)], args=[lease_id]))

    async def wait_for_answer(self, key: EntryKey, *, timeout_s: float, lease_ms: int = 0
                              ) -> tuple[bytes | None, str | None]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        keys = [*self._index_keys, self._entry_key(key), self._lease_key(key)]
        poll_s = _MIN_POLL_S
        while True:
            lease_id = new_lease_id()
            reply = await self._call("wait_for_answer", self._get_script(
                keys=keys, args=[lease_id, lease_ms if lease_ms > 0
                                 else self.limits.default_lease_ms]))
            if isinstance(reply, bytes):
                return reply, None
            if reply == 1:
                return None, lease_id
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None, None
            await asyncio.sleep(min(poll_s, remaining))
            poll_s = min(2 * poll_s, _MAX_POLL_S)

    async def num_entries(self) -> int:
        return (await self._stats())[0]

    async def num_bytes(self) -> int:
        return (await self._stats())[1]

    async def close(self) -> None:
        """Closes the client's connections; never fails for Redis being down."""
        await self.client.aclose()

    async def _stats(self) -> tuple[int, int]:
        num_entries, num_bytes = await self._call("stats", self._stats_script(
            keys=self._index_keys, args=[_MAX_NUM_PURGED]))
        return int(num_entries), int(num_bytes)

    def _entry_key(self, key: EntryKey) -> str:
        return f"{self.prefix}:e:{_hex(key.tenant)}:{_hex(key.version)}:{key.digest}"

    def _lease_key(self, key: EntryKey) -> str:
        return f"{self.prefix}:l:{_hex(key.tenant)}:{_hex(key.version)}:{key.digest}"

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await call
        except (RedisError, OSError) as exc:  # OSError covers TimeoutError
            if isinstance(exc, RedisTimeoutError):  # the client's own socket timeout
                reason = f"no reply within {self._socket_timeout_s:g} s ({exc})"
            elif isinstance(exc, TimeoutError):
                reason = f"no reply within {self._timeout_s:g} s"
            else:
                reason = f"{type(exc).__name__}: {exc}"
            raise StoreUnavailable(f"redis cache store failed on {what}: {reason}") from exc


def _hex(text: str) -> str:
    return text.encode().hex()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
