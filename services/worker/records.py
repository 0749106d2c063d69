"""Generation records on the worker's side: each request's token timings, and the sink
that appends finished records to a capped Redis stream so a shadow version's answers can
be compared with the primary's (the record format: ``genmesh/core/records.py``).

Envoy mirrors a share of Generate calls to the candidate version (``x-genmesh-shadow``);
both workers see the same worker request id. ``genmesh rollout report`` pairs the records
by that id. Recording never delays or fails a request: it runs after the reply is sent,
bounded by a timeout, and a failure is only counted and logged.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as redis

from genmesh.core.records import STREAM, GenerationRecord

log = logging.getLogger("genmesh.worker")

MAX_RECORDS = 20_000  # the stream is trimmed to about this many entries
WRITE_TIMEOUT_S = 1.0


class Timing:
    """Token arrival times of one request, measured where the worker sends them."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last = self.start
        self.num_tokens = 0

    def tokens(self, n: int) -> None:
        if n == 0:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.num_tokens += n

    @property
    def ttft_ms(self) -> float:
        return 0.0 if self.first is None else (self.first - self.start) * 1e3

    @property
    def decode_tokens_per_s(self) -> float:
        if self.first is None or self.num_tokens < 2 or self.last <= self.first:
            return 0.0
        return (self.num_tokens - 1) / (self.last - self.first)


class RecordSink:
    """Appends records to the stream in the background; the only writer of the stream."""

    def __init__(self, url: str, *, max_entries: int = MAX_RECORDS) -> None:
        self.max_entries = max_entries
        self.client = redis.Redis.from_url(url, socket_timeout=WRITE_TIMEOUT_S,
                                           socket_connect_timeout=WRITE_TIMEOUT_S)
        self.num_failed = 0
        self._pending: set[asyncio.Task] = set()

    def add(self, record: GenerationRecord) -> None:
        task = asyncio.create_task(self._write(record))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, record: GenerationRecord) -> None:
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await self.client.xadd(STREAM, record.to_fields(),  # type: ignore[arg-type]
                                       maxlen=self.max_entries, approximate=True)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self.num_failed += 1
            if self.num_failed == 1 or self.num_failed % 100 == 0:
                log.warning("could not record a generation",
                            extra={"error": str(exc), "num_failed": self.num_failed})

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(self._pending, timeout=WRITE_TIMEOUT_S)
        await self.client.aclose()
