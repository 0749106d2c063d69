"""Audit records reach a real Redis stream; a Redis that is down costs dropped records
(counted), never a failed or delayed check."""

from __future__ import annotations

import asyncio
import time

import redis

from services.safety.audit import STREAM, AuditLog, AuditRecord, RedisAuditStore
from tests.procs import RedisServer


def record(n: int) -> AuditRecord:
    return AuditRecord(time.time(), f"req-{n}", "dev", "prompt", "pii.email", "redact", "pii",
                       1.0)


def test_records_are_appended_to_the_stream(redis_server: RedisServer) -> None:
    async def main() -> int:
        log = AuditLog(RedisAuditStore(redis_server.url))
        log.record([record(n) for n in range(50)])
        await log.close()
        return log.num_written

    assert asyncio.run(main()) == 50
    entries = redis.Redis.from_url(redis_server.url).xrange(STREAM)
    assert len(entries) == 50
    fields = {k.decode(): v.decode() for k, v in entries[0][1].items()}
    assert fields["request_id"] == "req-0" and fields["category"] == "pii.email"


def test_a_dead_store_drops_and_counts_without_blocking(redis_server: RedisServer) -> None:
    redis_server.kill()

    async def main() -> tuple[float, int]:
        log = AuditLog(RedisAuditStore(redis_server.url))
        t0 = time.perf_counter()
        log.record([record(n) for n in range(10)])  # returns at once
        elapsed = time.perf_counter() - t0
        await asyncio.sleep(1.5)
        await log.close(timeout_s=0.5)
        return elapsed, log.num_dropped

    elapsed, dropped = asyncio.run(main())
    assert elapsed < 0.05
    assert dropped == 10
