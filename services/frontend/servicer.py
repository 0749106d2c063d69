"""The public Generation service: translates protos to pipeline requests and events back
to protos. The pipeline and the chat session hold the logic; every handler's errors
become status codes in one place (``status.maps_errors``)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import grpc
from opentelemetry import propagate

from genmesh.core import metadata
from genmesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from services.frontend.admission import Admission, AdmissionPolicy
from services.frontend.batch import BatchRun
from services.frontend.catalog import ModelCatalog
from services.frontend.chat import ChatSession
from services.frontend.errors import PipelineError
from services.frontend.events import Finished, Started, TextChunk
from services.frontend.jobs import JobQueue, JobRecord
from services.frontend.pipeline import Pipeline, PipelineRequest
from services.frontend.requests import generate_whole, pipeline_request
from services.frontend.status import maps_errors


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, *, pipeline: Pipeline, catalog: ModelCatalog, max_generation_s: float,
                 max_session_turns: int, admission: Admission | None = None,
                 jobs: JobQueue | None = None, max_batch_inflight: int = 8) -> None:
        self.pipeline = pipeline
        self.admission = admission or Admission(AdmissionPolicy(tenants={}), None)
        self.catalog = catalog
        self.max_generation_s = max_generation_s
        self.max_session_turns = max_session_turns
        self.jobs = jobs  # None: no job store (no Redis): the job calls are UNAVAILABLE
        self.max_batch_inflight = max_batch_inflight

    @maps_errors
    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> generation_pb2.GenerateResponse:
        req = self._pipeline_request(request, context, common_pb2.PRIORITY_NORMAL, "Generate")
        return await generate_whole(self.pipeline, req, timeout_s=self._timeout(context))

    @maps_errors
    async def GenerateStream(self, request: generation_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        req = self._pipeline_request(request, context, common_pb2.PRIORITY_INTERACTIVE,
                                     "GenerateStream")
        async with contextlib.aclosing(
                self.pipeline.run(req, timeout_s=self._timeout(context))) as events:
            async for event in events:
                if type(event) is TextChunk:
                    yield generation_pb2.GenerateStreamResponse(
                        text=event.text, index=event.index,
                        logprobs=[c.logprob for c in event.logprobs])
                elif type(event) is Started:
                    yield generation_pb2.GenerateStreamResponse(
                        model_version=event.model_version, request_id=event.request_id)
                elif type(event) is Finished:
                    yield generation_pb2.GenerateStreamResponse(
                        finish_reason=event.finish_reason, usage=event.usage,
                        finish_detail=event.detail, index=event.index,
                        tool_calls=event.tool_calls)

    @maps_errors
    async def Chat(self, request_iterator: AsyncIterator[generation_pb2.ChatRequest],
                   context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[generation_pb2.ChatEvent]:
        tenant = self.admission.tenant(context.invocation_metadata())
        session = ChatSession(pipeline=self.pipeline, catalog=self.catalog,
                              timeout_s=self._timeout(context),
                              max_turns=self.max_session_turns, tenant=tenant,
                              trace_context=propagate.extract(
                                  dict(context.invocation_metadata() or ())))
        async with contextlib.aclosing(session.run(request_iterator)) as events:
            async for event in events:
                yield event

    @maps_errors
    async def ListModels(self, request: generation_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext
                         ) -> generation_pb2.ListModelsResponse:
        self.admission.tenant(context.invocation_metadata())
        return await self.catalog.list_models()

    @maps_errors
    async def GenerateBatch(self, request_iterator: AsyncIterator[generation_pb2.BatchRequest],
                            context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[generation_pb2.BatchResult]:
        tenant = self.admission.tenant(context.invocation_metadata())
        run = BatchRun(pipeline=self.pipeline, catalog=self.catalog, tenant=tenant,
                       max_inflight=self.max_batch_inflight, timeout_s=self.max_generation_s,
                       new_request_id=lambda: uuid.uuid4().hex)
        async for result in run.run(request_iterator):
            yield result

    @maps_errors
    async def SubmitJob(self, request: generation_pb2.SubmitJobRequest,
                        context: grpc.aio.ServicerContext) -> generation_pb2.Job:
        jobs, tenant = self._job_store(), self._tenant(context)
        # Refuse what cannot run now, not after the job was queued.
        self.pipeline.limits.check(pipeline_request(
            request.request, catalog=self.catalog, tenant=tenant, request_id="",
            priority=common_pb2.PRIORITY_BATCH, method="Job"))
        record = await jobs.submit(request.job_id or uuid.uuid4().hex,
                                   request.request.SerializeToString(), tenant=tenant)
        return record.to_proto()

    @maps_errors
    async def GetJob(self, request: generation_pb2.JobRef,
                     context: grpc.aio.ServicerContext) -> generation_pb2.Job:
        jobs, tenant = self._job_store(), self._tenant(context)
        record = await jobs.get(request.job_id, tenant=tenant) if request.job_id else None
        return _found(record, request.job_id).to_proto()

    @maps_errors
    async def WatchJob(self, request: generation_pb2.JobRef,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[generation_pb2.Job]:
        jobs, tenant = self._job_store(), self._tenant(context)
        if not request.job_id:
            raise _not_found(request.job_id)
        is_found = False
        async with contextlib.aclosing(jobs.watch(
                request.job_id, tenant=tenant, timeout_s=self._timeout(context))) as records:
            async for record in records:  # nothing when the tenant has no such job
                is_found = True
                yield record.to_proto()
        if not is_found:
            raise _not_found(request.job_id)

    @maps_errors
    async def CancelJob(self, request: generation_pb2.JobRef,
                        context: grpc.aio.ServicerContext) -> generation_pb2.Job:
        jobs, tenant = self._job_store(), self._tenant(context)
        record = await jobs.cancel(request.job_id, tenant=tenant) if request.job_id else None
        return _found(record, request.job_id).to_proto()

    def _job_store(self) -> JobQueue:
        if self.jobs is None:
            raise PipelineError(grpc.StatusCode.UNAVAILABLE,
                                "async jobs need a job store: this deployment names no "
                                "redis_url")
        return self.jobs

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        return self.admission.tenant(context.invocation_metadata())

    def _pipeline_request(self, request: generation_pb2.GenerateRequest,
                          context: grpc.aio.ServicerContext,
                          priority: common_pb2.Priority, method: str) -> PipelineRequest:
        return pipeline_request(
            request, catalog=self.catalog, priority=priority, method=method,
            tenant=self.admission.tenant(context.invocation_metadata()),
            request_id=_edge_request_id(context) or uuid.uuid4().hex)

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        """The caller's remaining deadline, capped by the longest generation allowed."""
        remaining = context.time_remaining()
        return self.max_generation_s if remaining is None else min(remaining,
                                                                   self.max_generation_s)


def _found(record: JobRecord | None, job_id: str) -> JobRecord:
    """The caller's job, or NOT_FOUND."""
    if record is None:
        raise _not_found(job_id)
    return record


def _not_found(job_id: str) -> PipelineError:
    # Job ids are each tenant's own: another tenant's job of the same id is another job,
    # which the caller's lookups never reach, so it is not named here either.
    return PipelineError(grpc.StatusCode.NOT_FOUND,
                         f"you have no job {job_id!r} (unknown, or expired)")


def _edge_request_id(context: grpc.aio.ServicerContext) -> str:
    return str(dict(context.invocation_metadata() or ()).get(metadata.REQUEST_ID, ""))
