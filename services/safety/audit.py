"""Audit records: one per safety decision, appended to a Redis stream or a JSONL file.

A record says who (request id, tenant), where (prompt or output), what (category,
action, scanner, score, attack family) and when; never the text, so no PII reaches the
audit store. A decision with no findings is recorded too, as category "none" with action
allow, so the audit trail covers every request checked.

Writing never delays or fails a check: records go into a bounded queue that a background
task drains in batches. A full queue, or a store that is down, drops records and counts
them (``num_dropped``), and says so in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import redis.asyncio as redis

log = logging.getLogger("genmesh.safety")

STREAM = "genmesh:safety:audit"
MAX_RECORDS = 1_000_000  # the Redis stream is trimmed to about this many entries
WRITE_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class AuditRecord:
    ts: float  # unix time, seconds
    request_id: str
    tenant: str
    direction: str  # "prompt" or "output"
    category: str  # e.g. "prompt_injection", "pii.email"; "none" for a clean text
    action: str  # "allow", "redact" or "block"
    scanner: str  # which scanner decided; "" for "none"
    score: float
    family: str = ""  # the attack family of a prompt-injection finding


class AuditStore(Protocol):
    async def append(self, records: list[AuditRecord]) -> None: ...
    async def close(self) -> None: ...


class RedisAuditStore:
    def __init__(self, url: str, *, stream: str = STREAM, max_records: int = MAX_RECORDS
                 ) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=WRITE_TIMEOUT_S,
                                           socket_connect_timeout=WRITE_TIMEOUT_S)
        self.stream = stream
        self.max_records = max_records

    async def append(self, records: list[AuditRecord]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for r in records:
            pipe.xadd(self.stream, {k: str(v) for k, v in asdict(r).items()},
                      maxlen=self.max_records, approximate=True)
        await pipe.execute()

    async def close(self) -> None:
        await self.client.aclose()


class JsonlAuditStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    async def append(self, records: list[AuditRecord]) -> None:
        lines = "".join(json.dumps(asdict(r), separators=(",", ":")) + "\n" for r in records)
        await asyncio.to_thread(self._write, lines)

    def _write(self, lines: str) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(lines)

    async def close(self) -> None:
        return None


class AuditLog:
    """The queue in front of a store, and the task that drains it."""

    def __init__(self, store: AuditStore | None, *, max_queued: int = 100_000,
                 max_batch: int = 500) -> None:
        self.store = store
        self.queue: asyncio.Queue[AuditRecord] = asyncio.Queue(max_queued)
        self.max_batch = max_batch
        self.num_written = 0
        self.num_dropped = 0
        self._task: asyncio.Task[None] | None = None

    def record(self, records: list[AuditRecord]) -> None:
        if self.store is None:
            return
        for r in records:
            try:
                self.queue.put_nowait(r)
            except asyncio.QueueFull:
                self.num_dropped += 1
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        assert self.store is not None
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                await asyncio.wait_for(self.store.append(batch), WRITE_TIMEOUT_S * 2)
                self.num_written += len(batch)
            except Exception as exc:  # the store is down or slow: count, log, go on
                self.num_dropped += len(batch)
                log.warning("audit records dropped", extra={
                    "count": len(batch), "dropped_total": self.num_dropped,
                    "error": f"{type(exc).__name__}: {exc}"})
                await asyncio.sleep(0.5)

    async def close(self, timeout_s: float = 2.0) -> None:
        """Write what is queued (up to ``timeout_s``), then stop."""
        deadline = time.monotonic() + timeout_s
        while not self.queue.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.store is not None:
            await self.store.close()
