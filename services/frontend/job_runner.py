"""Runs async jobs: every frontend takes jobs from the shared queue (``jobs.py``) and runs
them through the pipeline at batch priority, up to ``max_running`` at a time.

While a job runs, a heartbeat keeps the claim every third of the claim timeout; a
heartbeat that finds the job ended (cancelled by the client, or finished by another
frontend that took it over) cancels the work. A frontend that dies stops its heartbeats,
and another one takes the job over after the timeout; the queue lets only the first
finish count, so the client sees one result. A job that fails because a service was
down or too slow is left to be taken over the same way, up to ``max_attempts`` times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import grpc

from genmesh.v1 import common_pb2, generation_pb2
from services.common import telemetry
from services.frontend.catalog import ModelCatalog
from services.frontend.jobs import Claim, JobQueue, JobStoreUnavailable
from services.frontend.pipeline import Pipeline
from services.frontend.requests import generate_whole, pipeline_request
from services.frontend.status import status_of

log = logging.getLogger("genmesh.frontend")
tracer = telemetry.tracer(__name__)

IDLE_RETRY_S = 1.0  # after the store failed: wait this long before asking again
# Failures worth another attempt: a service down, or slower than its deadline.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE.value[0],
                       grpc.StatusCode.DEADLINE_EXCEEDED.value[0]})


class JobRunner:
    def __init__(self, queue: JobQueue, *, pipeline: Pipeline, catalog: ModelCatalog,
                 max_running: int, claim_timeout_s: float, timeout_s: float,
                 max_attempts: int = 3) -> None:
        self.queue = queue
        self.pipeline = pipeline
        self.catalog = catalog
        self.max_running = max_running
        self.heartbeat_s = claim_timeout_s / 3
        self.timeout_s = timeout_s  # longest a job's generation may run
        # Attempts a job gets when it keeps failing transiently; the last failure is final.
        self.max_attempts = max_attempts
        self._running: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Take and run jobs until cancelled (at shutdown: running jobs are cancelled too,
        and other frontends take them over)."""
        slots = asyncio.Semaphore(self.max_running)
        try:
            while True:
                await slots.acquire()
                try:
                    claim = await self.queue.take(block_ms=1000)
                except JobStoreUnavailable as exc:
                    log.warning("job store unavailable", extra={"detail": str(exc)})
                    claim = None
                    await asyncio.sleep(IDLE_RETRY_S)
                if claim is None:
                    slots.release()
                    continue
                task = asyncio.ensure_future(self._run_job(claim))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
                task.add_done_callback(lambda _: slots.release())
        finally:
            for task in list(self._running):
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)

    async def _run_job(self, claim: Claim) -> None:
        log.info("job started", extra={"tenant": claim.tenant, "job_id": claim.job_id,
                                       "attempt": claim.record.num_attempts})
        work = asyncio.ensure_future(self._generate(claim))
        try:
            while not work.done():
                done, _ = await asyncio.wait({work}, timeout=self.heartbeat_s)
                if not done and not await self._heartbeat(claim):
                    work.cancel()  # cancelled by the client, or finished elsewhere
                    log.info("job ended elsewhere; stopped", extra={"job_id": claim.job_id})
                    return
            result, code, error = work.result()
            if code in TRANSIENT and claim.record.num_attempts < self.max_attempts:
                # A service was down or slow: leave the claim to time out, and the job runs
                # again (here or on another frontend), instead of failing for good.
                log.warning("job failed for now; it will be retried", extra={
                    "job_id": claim.job_id, "attempt": claim.record.num_attempts,
                    "error": error})
                return
            ended = await self.queue.finish(claim, result=result, error_code=code, error=error)
            log.info("job finished", extra={"job_id": claim.job_id, "ended_here": ended,
                                            "error": error})
        except JobStoreUnavailable as exc:
            # The claim stays pending; this or another frontend runs the job again later.
            log.warning("job result not recorded", extra={"job_id": claim.job_id,
                                                          "detail": str(exc)})
        finally:
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work

    async def _heartbeat(self, claim: Claim) -> bool:
        try:
            return await self.queue.heartbeat(claim)
        except JobStoreUnavailable as exc:
            # Keep working: the store may be back before the claim times out.
            log.warning("job heartbeat failed", extra={"job_id": claim.job_id,
                                                       "detail": str(exc)})
            return True

    async def _generate(self, claim: Claim) -> tuple[bytes | None, int, str]:
        """(serialized GenerateResponse, 0, "") or (None, grpc code, message)."""
        try:
            request = generation_pb2.GenerateRequest.FromString(claim.record.request)
            req = pipeline_request(request, catalog=self.catalog, tenant=claim.tenant,
                                   request_id=f"job-{claim.job_id}-{uuid.uuid4().hex[:6]}",
                                   priority=common_pb2.PRIORITY_BATCH, method="Job")
            # A job is a trace of its own (its client is gone): one per attempt.
            with tracer.start_as_current_span("genmesh.job", attributes={
                    "genmesh.job_id": claim.job_id,
                    "genmesh.attempt": claim.record.num_attempts}):
                reply = await generate_whole(self.pipeline, req, timeout_s=self.timeout_s)
        except Exception as exc:
            status = status_of(exc)
            if status is None:  # a job's bug fails the job, not the runner
                log.exception("job failed", extra={"job_id": claim.job_id})
                status = grpc.StatusCode.INTERNAL, f"the job failed: {exc}"
            return None, status[0].value[0], status[1]
        return reply.SerializeToString(), 0, ""
