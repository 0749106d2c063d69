"""Generation records: what each finished request produced and how fast, kept in a capped
Redis stream so a shadow version's answers can be compared with the primary's.

Envoy mirrors a share of Generate calls to the candidate version (``x-genmesh-shadow``);
both workers see the same worker request id. ``genmesh rollout report`` pairs the records
by that id. Recording never delays or fails a request: it runs after the reply is sent,
bounded by a timeout, and a failure is only counted and logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass

import redis.asyncio as redis

log = logging.getLogger("genmesh.worker")

STREAM = "genmesh:rollout:records"
MAX_RECORDS = 20_000  # the stream is trimmed to about this many entries
WRITE_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class GenerationRecord:
    request_id: str  # the worker request id: equal on the primary and its shadow copy
    model_version: str
    is_shadow: bool
    token_ids: tuple[int, ...]  # every generated token
    finish_reason: str
    ttft_ms: float  # call start → first token
    decode_tokens_per_s: float  # after the first token; 0 with one token or fewer

    def to_fields(self) -> dict[str, str]:
        fields = asdict(self)
        fields["is_shadow"] = "1" if self.is_shadow else "0"
        fields["token_ids"] = ",".join(map(str, self.token_ids))
        return {k: str(v) for k, v in fields.items()}

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> GenerationRecord:
        return cls(request_id=fields["request_id"], model_version=fields["model_version"],
                   is_shadow=fields["is_shadow"] == "1",
                   token_ids=tuple(int(t) for t in fields["token_ids"].split(",") if t),
                   finish_reason=fields["finish_reason"], ttft_ms=float(fields["ttft_ms"]),
                   decode_tokens_per_s=float(fields["decode_tokens_per_s"]))


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

    def __init__(self, url: str) -> None:
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
                                       maxlen=MAX_RECORDS, approximate=True)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self.num_failed += 1
            if self.num_failed == 1 or self.num_failed % 100 == 0:
                log.warning("could not record a generation",
                            extra={"error": str(exc), "num_failed": self.num_failed})

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(self._pending, timeout=WRITE_TIMEOUT_S)
        await self.client.aclose()
