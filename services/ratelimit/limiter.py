"""A request's descriptors -> the limits they match -> their counts -> a decision per
descriptor."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from services.ratelimit.counters import Hit, RedisCounters, counter_name
from services.ratelimit.limits import LimitsFile, RateLimit

log = logging.getLogger("genmesh.ratelimit")


@dataclass(frozen=True, slots=True)
class Descriptor:
    entries: tuple[tuple[str, str], ...]  # (key, value) pairs, at least one
    override: RateLimit | None = None  # a limit sent with the request, instead of the file's


@dataclass(frozen=True, slots=True)
class Decision:
    limit: RateLimit | None  # the limit that applied; None: no limit, always allowed
    is_over_limit: bool = False
    num_remaining: int = 0  # hits left in the window after this request's (0 when over)
    reset_s: float = 0.0  # seconds until the window ends


NO_LIMIT = Decision(limit=None)


class RateLimiter:
    def __init__(self, *, limits: LimitsFile, counters: RedisCounters) -> None:
        self.limits = limits
        self.counters = counters

    async def check(self, domain: str, descriptors: Sequence[Descriptor], *,
                    num_hits: int) -> list[Decision]:
        """Adds ``num_hits`` (at least 1) to the counter of every descriptor a limit applies
        to, and decides each. A descriptor is over its limit when its count, this
        request's hits included, exceeds the limit; hits over the limit still count.
        Raises CountersUnavailableError; Redis is not asked when no limit applies."""
        config = self.limits.current()
        if domain != config.domain:
            log.debug("no limits for this domain", extra={"domain": domain,
                                                          "configured": config.domain})
            return [NO_LIMIT for _ in descriptors]
        limits = [d.override or config.find(d.entries) for d in descriptors]
        counts = iter(await self.counters.add([
            Hit(counter_name(domain, d.entries, limit.unit), limit.unit.seconds, num_hits)
            for d, limit in zip(descriptors, limits, strict=True) if limit is not None]))
        decisions = []
        for limit in limits:
            if limit is None:
                decisions.append(NO_LIMIT)
                continue
            window = next(counts)
            decisions.append(Decision(
                limit=limit, is_over_limit=window.num_hits > limit.requests_per_unit,
                num_remaining=max(0, limit.requests_per_unit - window.num_hits),
                reset_s=window.reset_s))
        return decisions
