"""The rate-limit service in-process over a real Redis (the ``redis_server`` fixture)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc

from genmesh.rls.v3 import rls_pb2_grpc
from services.ratelimit.counters import RedisCounters
from services.ratelimit.limiter import RateLimiter
from services.ratelimit.limits import LimitsFile
from services.ratelimit.servicer import RateLimitServicer

T0 = 1_767_225_610.0  # 2026-01-01 00:00:10 UTC: 10 s into a minute, hour and day window


@asynccontextmanager
async def ratelimit_stub(limits_path: Path, redis_url: str, *,
                         clock: Callable[[], float] | None = None, timeout_s: float = 0.25,
                         check_interval_s: float = 0.0
                         ) -> AsyncIterator[rls_pb2_grpc.RateLimitServiceStub]:
    """The service's servicer on a grpc.aio server on a free port, and a stub to it."""
    counters = RedisCounters.from_url(redis_url, timeout_s=timeout_s, clock=clock)
    limiter = RateLimiter(limits=LimitsFile(limits_path, check_interval_s=check_interval_s),
                          counters=counters)
    server = grpc.aio.server()
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitServicer(limiter), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield rls_pb2_grpc.RateLimitServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(0)
        await counters.close()
