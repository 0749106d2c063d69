"""Envoy's RateLimitService: translates protos to the limiter and its errors to status
codes, and a refusal (``refusal.py``) to the answer's body and headers."""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from genmesh.rls.v3 import rls_pb2, rls_pb2_grpc
from services.ratelimit import metrics
from services.ratelimit.counters import CountersUnavailableError
from services.ratelimit.limiter import Decision, Descriptor, RateLimiter
from services.ratelimit.limits import RateLimit, Unit
from services.ratelimit.refusal import refusal

Status = rls_pb2.RateLimitResponse.DescriptorStatus
Code = rls_pb2.RateLimitResponse.Code
UNIT_FROM_PROTO = {rls_pb2.SECOND: Unit.SECOND, rls_pb2.MINUTE: Unit.MINUTE,
                   rls_pb2.HOUR: Unit.HOUR, rls_pb2.DAY: Unit.DAY}


def descriptors_from_proto(descriptors: Iterable[rls_pb2.RateLimitDescriptor]
                           ) -> list[Descriptor]:
    """The request's descriptors; ValueError naming the first malformed one."""
    converted = [_descriptor(d, f"descriptors[{n}]") for n, d in enumerate(descriptors)]
    if not converted:
        raise ValueError("descriptors is empty: a request needs at least one descriptor")
    return converted


def _descriptor(d: rls_pb2.RateLimitDescriptor, where: str) -> Descriptor:
    if not d.entries:
        raise ValueError(f"{where}.entries is empty: a descriptor needs at least one entry")
    for n, entry in enumerate(d.entries):
        if not entry.key or not entry.value:
            raise ValueError(f"{where}.entries[{n}]: key and value must not be empty "
                             f"(key={entry.key!r}, value={entry.value!r})")
    override = None
    if d.HasField("limit"):
        if d.limit.unit not in UNIT_FROM_PROTO or d.limit.requests_per_unit == 0:
            raise ValueError(f"{where}.limit: needs a unit (SECOND, MINUTE, HOUR or DAY) and "
                             f"requests_per_unit of at least 1 (unit={d.limit.unit}, "
                             f"requests_per_unit={d.limit.requests_per_unit})")
        override = RateLimit(d.limit.requests_per_unit, UNIT_FROM_PROTO[d.limit.unit])
    return Descriptor(tuple((e.key, e.value) for e in d.entries), override)


def status_to_proto(decision: Decision) -> rls_pb2.RateLimitResponse.DescriptorStatus:
    if decision.limit is None:
        return Status(code=Code.OK)
    limit = rls_pb2.RateLimitResponse.RateLimit(
        name=decision.limit.name, requests_per_unit=decision.limit.requests_per_unit,
        unit=rls_pb2.RateLimitResponse.RateLimit.Unit.Value(decision.limit.unit.name))
    status = Status(code=Code.OVER_LIMIT if decision.is_over_limit else Code.OK,
                    current_limit=limit, limit_remaining=decision.num_remaining)
    status.duration_until_reset.FromMicroseconds(round(decision.reset_s * 1_000_000))
    return status


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    async def ShouldRateLimit(self, request: rls_pb2.RateLimitRequest,
                              context: grpc.aio.ServicerContext
                              ) -> rls_pb2.RateLimitResponse:
        try:
            descriptors = descriptors_from_proto(request.descriptors)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # abort raises; this keeps the type checker informed
        try:
            decisions = await self.limiter.check(request.domain, descriptors,
                                                 num_hits=request.hits_addend or 1)
        except CountersUnavailableError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise
        metrics.count(descriptors, decisions)
        statuses = [status_to_proto(d) for d in decisions]
        refused = refusal(descriptors, decisions)
        if refused is None:
            return rls_pb2.RateLimitResponse(overall_code=Code.OK, statuses=statuses)
        return rls_pb2.RateLimitResponse(
            overall_code=Code.OVER_LIMIT, statuses=statuses, raw_body=refused.message.encode(),
            response_headers_to_add=[rls_pb2.HeaderValue(key=name, value=value)
                                     for name, value in refused.headers])
