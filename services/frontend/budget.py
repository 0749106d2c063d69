"""Per-tenant token budgets: tokens per minute, reserved in Redis before a request runs.

A request is admitted only if its tenant's current window can hold
``prompt_tokens + max_tokens``. That amount is reserved up front, by one Lua script that
checks and adds atomically, so concurrent requests across any number of frontend
processes can never overshoot. When the request ends (finished, stopped early,
cancelled or failed) ``Reservation.settle`` refunds what it did not use.

The guarantee: within each window (a calendar minute ``[k·60, (k+1)·60)`` of Redis's
clock, the same for every frontend) the tokens reserved never exceed the tenant's
``tokens_per_minute``. A request whose window admitted it never runs over, since the
worker never generates more than ``max_tokens``.

Its limits, plainly:

- It is a fixed window, not a sliding one: a tenant may spend its whole budget in the
  last second of one window and again in the first second of the next, so any 60
  seconds that straddle a boundary can admit up to 2× the budget.
- A refund goes back to the window the tokens were taken from, even when the request
  ends in a later one; a refund to a window that has ended (or whose key expired) frees
  nothing that anyone can still use, and is harmless.
- Tokens are held from admission until settle: long generations tie up their whole
  ``max_tokens`` until they end, and a frontend that dies mid-request never refunds
  (the window's key expires on its own).
- The key is built inside the script from Redis's clock, so it is not declared in
  KEYS: this needs one Redis (with or without replicas), not Redis Cluster.
- When Redis is down or slow, ``FailureMode.OPEN`` admits without a reservation (no
  guarantee for those requests, and they are counted), ``FailureMode.CLOSED`` refuses.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from dataclasses import dataclass, field

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from genmesh.core.failure import FailureMode

log = logging.getLogger("genmesh.frontend.budget")

KEY_PREFIX = "genmesh:budget:"
WINDOW_S = 60
_EXPIRY_SLACK_S = 5  # a window's key outlives the window by this much

# A window's key is a hash: "used" is the tokens reserved in the window; "r:<id>" is what
# reservation <id> still holds, deleted when it settles (so a second settle, or a retried
# one, finds nothing to refund).
#
# ARGV: key prefix, tenant, tokens wanted, limit, window seconds, reservation id, slack.
# Returns {1 if admitted else 0, window start, tokens free after, ms until the window ends}.
_RESERVE_LUA = """
local now = redis.call('TIME')
local sec, usec = tonumber(now[1]), tonumber(now[2])
local window_s = tonumber(ARGV[5])
local start = sec - sec % window_s
local key = ARGV[1] .. ARGV[2] .. ':' .. start
local reset_ms = math.floor(((start + window_s - sec) * 1000000 - usec) / 1000)
local wanted, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local used = tonumber(redis.call('HGET', key, 'used')) or 0
local held = 'r:' .. ARGV[6]
if redis.call('HEXISTS', key, held) == 1 then
  return {1, start, limit - used, reset_ms}
end
if wanted > limit - used then
  return {0, start, limit - used, reset_ms}
end
redis.call('HINCRBY', key, 'used', wanted)
redis.call('HSET', key, held, wanted)
redis.call('EXPIREAT', key, start + window_s + tonumber(ARGV[7]))
return {1, start, limit - used - wanted, reset_ms}
"""

# KEYS[1]: the window's key. ARGV: reservation id, tokens used. Returns tokens refunded.
_SETTLE_LUA = """
local held = 'r:' .. ARGV[1]
local reserved = tonumber(redis.call('HGET', KEYS[1], held))
if not reserved then
  return 0
end
redis.call('HDEL', KEYS[1], held)
local used = tonumber(redis.call('HGET', KEYS[1], 'used')) or 0
local refund = math.min(math.max(reserved - tonumber(ARGV[2]), 0), used)
if refund > 0 then
  redis.call('HINCRBY', KEYS[1], 'used', -refund)
end
return refund
"""


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    tokens_per_minute: int  # prompt + generated tokens a tenant may reserve per window

    def __post_init__(self) -> None:
        if self.tokens_per_minute <= 0:
            raise ValueError(f"tokens_per_minute must be positive, got {self.tokens_per_minute}")


class BudgetError(Exception):
    """A request the budget does not admit; ``message`` says what the caller can do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BudgetExceeded(BudgetError):
    """The tenant's window has too few tokens left now; it resets in ``reset_in_s``."""

    def __init__(self, tenant: str, *, limit: int, num_requested_tokens: int,
                 num_free_tokens: int, reset_in_s: float) -> None:
        super().__init__(
            f"tenant {tenant!r} has {num_free_tokens} of its {limit} tokens per minute left "
            f"(its tokens_per_minute limit) and this request needs {num_requested_tokens} "
            f"(prompt + max_tokens); retry in {math.ceil(reset_in_s)} s, when the budget "
            f"resets")
        self.tenant = tenant
        self.limit = limit
        self.num_requested_tokens = num_requested_tokens
        self.num_free_tokens = num_free_tokens
        self.reset_in_s = reset_in_s


class RequestTooLarge(BudgetError):
    """The request needs more than the tenant's whole budget: waiting will not help."""

    def __init__(self, tenant: str, *, limit: int, num_requested_tokens: int) -> None:
        super().__init__(
            f"this request needs {num_requested_tokens} tokens (prompt + max_tokens) but "
            f"tenant {tenant!r} may use only {limit} per minute (its tokens_per_minute "
            f"limit); lower max_tokens (or shorten the prompt) so that prompt + max_tokens "
            f"<= {limit}")
        self.tenant = tenant
        self.limit = limit
        self.num_requested_tokens = num_requested_tokens


class BudgetUnavailable(BudgetError):
    """Redis failed or timed out and the failure mode is closed."""

    def __init__(self, tenant: str, *, reason: str) -> None:
        super().__init__(f"the token budget store is unavailable ({reason}); retry shortly")
        self.tenant = tenant
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Reservation:
    """Tokens taken from one tenant's window; settle it once the request ends."""

    tenant: str
    window_start: int  # the window charged, in epoch seconds of Redis's clock; 0 if none
    num_reserved_tokens: int  # 0 when admitted unreserved (Redis failed, mode open)
    reservation_id: str  # names the reservation in its window, so settling is idempotent
    # Who settles it; None when nothing was reserved.
    budgets: TokenBudgets | None = field(default=None, repr=False, compare=False)

    @property
    def is_reserved(self) -> bool:
        return self.budgets is not None

    async def settle(self, num_used_tokens: int) -> int:
        """Refunds ``num_reserved_tokens - num_used_tokens`` (prompt + generated) to the
        window charged; returns the tokens refunded. A second call refunds nothing."""
        if self.budgets is None:
            return 0
        return await self.budgets.settle(self, num_used_tokens)


def budget_key(tenant: str, window_start: int) -> str:
    return f"{KEY_PREFIX}{tenant}:{window_start}"


def redis_client(url: str, *, timeout_s: float) -> redis.Redis:
    """A client whose every call gives up after ``timeout_s``, with one immediate retry
    (a pooled connection can be stale after Redis restarts). Both scripts are idempotent,
    so a retried call never charges or refunds twice."""
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                retry=Retry(NoBackoff(), retries=1))


class TokenBudgets:
    """Reserves and refunds tenants' tokens in Redis; the only owner of the budget keys."""

    def __init__(self, client: redis.Redis, *, timeout_s: float, failure_mode: FailureMode,
                 window_s: int = WINDOW_S, warn_interval_s: float = 30.0) -> None:
        self.client = client
        self.timeout_s = timeout_s  # bound on every Redis call, whatever the client's own
        self.failure_mode = failure_mode
        self.window_s = window_s  # 60 in production; tests shorten it
        self.warn_interval_s = warn_interval_s  # at most one warning per interval
        self.num_unreserved_admissions = 0  # admitted without a reservation (mode open)
        self.num_lost_refunds = 0  # settles that failed: those tokens stay charged
        self._reserve_script = client.register_script(_RESERVE_LUA)
        self._settle_script = client.register_script(_SETTLE_LUA)
        self._last_warning_at = -float("inf")
        self._num_suppressed_warnings = 0

    async def reserve(self, tenant: str, num_tokens: int, policy: BudgetPolicy) -> Reservation:
        """Takes ``num_tokens`` (prompt + max_tokens) from the tenant's current window.
        Raises RequestTooLarge, BudgetExceeded, or BudgetUnavailable (mode closed)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must not be negative, got {num_tokens}")
        limit = policy.tokens_per_minute
        if num_tokens > limit:
            raise RequestTooLarge(tenant, limit=limit, num_requested_tokens=num_tokens)
        reservation_id = secrets.token_hex(8)
        try:
            async with asyncio.timeout(self.timeout_s):
                reply = await self._reserve_script(args=[
                    KEY_PREFIX, tenant, num_tokens, limit, self.window_s, reservation_id,
                    _EXPIRY_SLACK_S])
        except (RedisError, OSError) as exc:  # OSError covers TimeoutError
            reason = _describe(exc, self.timeout_s)
            if self.failure_mode == FailureMode.CLOSED:
                self._warn(f"token budget refused tenant {tenant!r}: {reason}")
                raise BudgetUnavailable(tenant, reason=reason) from exc
            self.num_unreserved_admissions += 1
            self._warn(f"token budget admitted tenant {tenant!r} unreserved: {reason}")
            return Reservation(tenant, 0, 0, reservation_id)
        is_admitted, window_start, num_free_tokens, reset_ms = (int(x) for x in reply)
        if not is_admitted:
            raise BudgetExceeded(tenant, limit=limit, num_requested_tokens=num_tokens,
                                 num_free_tokens=max(num_free_tokens, 0),
                                 reset_in_s=reset_ms / 1e3)
        return Reservation(tenant, window_start, num_tokens, reservation_id, self)

    async def settle(self, reservation: Reservation, num_used_tokens: int) -> int:
        """Refunds what ``reservation`` did not use; returns the tokens refunded. Never
        raises for Redis: a refund that fails is counted and the tokens stay charged,
        which can only admit less, never more."""
        if not reservation.is_reserved:
            return 0
        try:
            async with asyncio.timeout(self.timeout_s):
                refunded = await self._settle_script(
                    keys=[budget_key(reservation.tenant, reservation.window_start)],
                    args=[reservation.reservation_id, max(num_used_tokens, 0)])
        except (RedisError, OSError) as exc:
            self.num_lost_refunds += 1
            self._warn(f"token budget refund for tenant {reservation.tenant!r} lost: "
                       f"{_describe(exc, self.timeout_s)}")
            return 0
        return int(refunded)

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning_at < self.warn_interval_s:
            self._num_suppressed_warnings += 1
            return
        if self._num_suppressed_warnings:
            message += f" ({self._num_suppressed_warnings} similar warnings suppressed)"
        log.warning(message)
        self._last_warning_at, self._num_suppressed_warnings = now, 0


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError | RedisTimeoutError):
        return f"no reply from Redis within {timeout_s} s"
    return f"{type(exc).__name__}: {exc}"
