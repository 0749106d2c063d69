"""GenerateBatch: many requests over one stream, each answered as soon as it finishes.

Items run at batch priority, at most ``max_inflight`` at a time per stream: the worker
schedules online calls first, and the stream reads the next item only when a slot is
free, so a client sending 10,000 items is held back by gRPC flow control instead of
filling memory. A bad item gets its own error result; the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from genmesh.v1 import common_pb2, generation_pb2
from services.frontend.catalog import ModelCatalog
from services.frontend.pipeline import Pipeline
from services.frontend.requests import generate_whole, pipeline_request
from services.frontend.status import status_of

log = logging.getLogger("genmesh.frontend")

MAX_ID_CHARS = 256


class BatchRun:
    """One GenerateBatch stream: owns its items' tasks and the queue of their results."""

    def __init__(self, *, pipeline: Pipeline, catalog: ModelCatalog, tenant: str,
                 max_inflight: int, timeout_s: float, new_request_id: Callable[[], str]) -> None:
        self.pipeline = pipeline
        self.catalog = catalog
        self.tenant = tenant
        self.timeout_s = timeout_s
        self.new_request_id = new_request_id
        self._slots = asyncio.Semaphore(max_inflight)
        self._results: asyncio.Queue[generation_pb2.BatchResult | None] = asyncio.Queue()
        self._running: dict[str, asyncio.Task[None]] = {}  # item id → its task

    async def run(self, items: AsyncIterator[generation_pb2.BatchRequest]
                  ) -> AsyncIterator[generation_pb2.BatchResult]:
        """Results as they finish; ends when the client half-closed and all are sent."""
        reader = asyncio.ensure_future(self._read(items))
        try:
            while (result := await self._results.get()) is not None:
                yield result
            await reader  # raises the reader's error, if any
        finally:
            reader.cancel()
            for task in self._running.values():
                task.cancel()
            await asyncio.gather(reader, *self._running.values(), return_exceptions=True)

    async def _read(self, items: AsyncIterator[generation_pb2.BatchRequest]) -> None:
        try:
            async for item in items:
                await self._slots.acquire()
                error = self._bad_id(item.id)
                if error:
                    self._slots.release()
                    self._fail(item.id, grpc.StatusCode.INVALID_ARGUMENT, error)
                    continue
                self._running[item.id] = asyncio.ensure_future(self._run_item(item))
            await asyncio.gather(*self._running.values(), return_exceptions=True)
        finally:
            self._results.put_nowait(None)

    def _bad_id(self, item_id: str) -> str:
        if not item_id:
            return "id is empty: give every batch item an id of yours"
        if len(item_id) > MAX_ID_CHARS:
            return f"id has {len(item_id)} characters; at most {MAX_ID_CHARS}"
        if item_id in self._running:
            return f"id {item_id!r} is already running in this batch"
        return ""

    async def _run_item(self, item: generation_pb2.BatchRequest) -> None:
        try:
            req = pipeline_request(item.request, catalog=self.catalog, tenant=self.tenant,
                                   request_id=self.new_request_id(),
                                   priority=common_pb2.PRIORITY_BATCH, method="GenerateBatch")
            reply = await generate_whole(self.pipeline, req, timeout_s=self.timeout_s)
            self._results.put_nowait(generation_pb2.BatchResult(id=item.id, response=reply))
        except Exception as exc:
            status = status_of(exc)
            if status is None:  # one item's bug must not end the batch
                log.exception("batch item failed", extra={"item": item.id})
                status = grpc.StatusCode.INTERNAL, f"the item failed: {exc}"
            self._fail(item.id, *status)
        finally:
            with contextlib.suppress(KeyError):
                del self._running[item.id]
            self._slots.release()

    def _fail(self, item_id: str, code: grpc.StatusCode, message: str) -> None:
        self._results.put_nowait(generation_pb2.BatchResult(
            id=item_id, error_code=code.value[0], error=message))
