"""What a request over its limits is told, in words and in headers.

Envoy sends the rate-limit service's ``raw_body`` as the body of its 429 (a gRPC client
reads it as grpc-message; the HTTP API's error mapper quotes it) and adds
``response_headers_to_add`` to it. Both are sent on refusals only: headers on every
answer would also land on refusals by other limits (a frontend's token budget passes
Envoy's filters as an ordinary response), describing a limit that did not refuse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from genmesh.core import metadata
from services.ratelimit.limiter import Decision, Descriptor


@dataclass(frozen=True, slots=True)
class Refusal:
    # Names the limit and the wait, e.g. "tenant 'dev' is over its requests_per_minute
    # limit of 30, shared by all gateways; retry in 42 s".
    message: str
    # (name, value): x-ratelimit-limit/-remaining/-reset (draft 03) and retry-after.
    headers: tuple[tuple[str, str], ...]


def refusal(descriptors: Sequence[Descriptor], decisions: Sequence[Decision]
            ) -> Refusal | None:
    """The refusal of a request whose ``decisions`` (one per descriptor) put it over a
    limit; None when none does. Over several limits it names the one whose window ends
    last: only then do all of them have room again."""
    over = [(d, dec) for d, dec in zip(descriptors, decisions, strict=True)
            if dec.is_over_limit]
    if not over:
        return None
    descriptor, decision = max(over, key=lambda pair: pair[1].reset_s)
    limit = decision.limit
    assert limit is not None  # a decision over its limit has one
    wait_s = str(whole_seconds(decision.reset_s))
    who = ", ".join(f"{key} '{value}'" for key, value in descriptor.entries)
    message = (f"{who} is over its requests_per_{limit.unit.name.lower()} limit of "
               f"{limit.requests_per_unit}, shared by all gateways; retry in {wait_s} s")
    return Refusal(message, (("x-ratelimit-limit", str(limit.requests_per_unit)),
                             ("x-ratelimit-remaining", "0"),
                             ("x-ratelimit-reset", wait_s),
                             (metadata.RETRY_AFTER, wait_s)))


def whole_seconds(seconds: float) -> int:
    """A wait in whole seconds, rounded up, so that retrying after it finds the window
    ended (rounded down, the last second of a window would read 0: retry at once)."""
    return max(1, math.ceil(seconds))
