"""The public Generation service: translates protos to pipeline requests and pipeline
errors to gRPC status codes. The pipeline and the chat session hold the logic."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

import grpc

from genmesh.models.chat_template import ChatMessage
from genmesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from services.common import metadata
from services.frontend.admission import Admission, AdmissionPolicy
from services.frontend.catalog import ModelCatalog
from services.frontend.chat import ChatSession
from services.frontend.errors import PipelineError
from services.frontend.pipeline import (
    Event,
    Finished,
    Pipeline,
    PipelineRequest,
    Started,
    TextChunk,
)


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, *, pipeline: Pipeline, catalog: ModelCatalog, max_generation_s: float,
                 max_session_turns: int, admission: Admission | None = None) -> None:
        self.pipeline = pipeline
        self.admission = admission or Admission(AdmissionPolicy(tenants={}), None)
        self.catalog = catalog
        self.max_generation_s = max_generation_s
        self.max_session_turns = max_session_turns

    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> generation_pb2.GenerateResponse:
        reply = generation_pb2.GenerateResponse()
        parts = []
        async for event in self._events(request, context, common_pb2.PRIORITY_NORMAL):
            if isinstance(event, Started):
                reply.model = event.model
                reply.model_version = event.model_version
                reply.request_id = event.request_id
            elif isinstance(event, TextChunk):
                parts.append(event.text)
            elif isinstance(event, Finished):
                reply.finish_reason = event.finish_reason
                reply.usage.CopyFrom(event.usage)
                reply.finish_detail = event.detail
        reply.text = "".join(parts)
        return reply

    async def GenerateStream(self, request: generation_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        async for event in self._events(request, context, common_pb2.PRIORITY_INTERACTIVE):
            if isinstance(event, Started):
                yield generation_pb2.GenerateStreamResponse(
                    model_version=event.model_version, request_id=event.request_id)
            elif isinstance(event, TextChunk):
                yield generation_pb2.GenerateStreamResponse(text=event.text)
            elif isinstance(event, Finished):
                yield generation_pb2.GenerateStreamResponse(finish_reason=event.finish_reason,
                                                            usage=event.usage,
                                                            finish_detail=event.detail)

    async def Chat(self, request_iterator: AsyncIterator[generation_pb2.ChatRequest],
                   context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[generation_pb2.ChatEvent]:
        try:
            tenant = self.admission.tenant(context.invocation_metadata())
        except PipelineError as exc:
            await context.abort(exc.code, exc.message)
        session = ChatSession(pipeline=self.pipeline, catalog=self.catalog,
                              timeout_s=self._timeout(context),
                              max_turns=self.max_session_turns, tenant=tenant)
        try:
            async with contextlib.aclosing(session.run(request_iterator)) as events:
                async for event in events:
                    yield event
        except PipelineError as exc:
            await context.abort(exc.code, exc.message)

    async def ListModels(self, request: generation_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext
                         ) -> generation_pb2.ListModelsResponse:
        try:
            self.admission.tenant(context.invocation_metadata())
            return await self.catalog.list_models()
        except PipelineError as exc:
            await context.abort(exc.code, exc.message)
            raise  # unreachable: abort raises

    async def _events(self, request: generation_pb2.GenerateRequest,
                      context: grpc.aio.ServicerContext,
                      priority: common_pb2.Priority) -> AsyncGenerator[Event, None]:
        try:
            req = self._pipeline_request(request, context, priority)
            async with contextlib.aclosing(
                    self.pipeline.run(req, timeout_s=self._timeout(context))) as events:
                async for event in events:
                    yield event
        except PipelineError as exc:
            await context.abort(exc.code, exc.message)

    def _pipeline_request(self, request: generation_pb2.GenerateRequest,
                          context: grpc.aio.ServicerContext,
                          priority: common_pb2.Priority) -> PipelineRequest:
        model, version = self.catalog.resolve(request.model, request.model_version)
        kind = request.WhichOneof("input")
        messages: tuple[ChatMessage, ...] = ()
        if kind == "prompt" and request.prompt:
            prompt = request.prompt
        elif kind == "chat" and request.chat.messages:
            prompt = None
            messages = tuple(ChatMessage(m.role, m.content) for m in request.chat.messages)
        else:
            raise PipelineError(grpc.StatusCode.INVALID_ARGUMENT,
                                "set a non-empty prompt or chat.messages")
        return PipelineRequest(
            request_id=request.request_id or _edge_request_id(context) or uuid.uuid4().hex,
            model=model, model_version=version, prompt=prompt, messages=messages,
            params=request.params, priority=priority,
            tenant=self.admission.tenant(context.invocation_metadata()))

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        """The caller's remaining deadline, capped by the longest generation allowed."""
        remaining = context.time_remaining()
        return self.max_generation_s if remaining is None else min(remaining,
                                                                   self.max_generation_s)


def _edge_request_id(context: grpc.aio.ServicerContext) -> str:
    return str(dict(context.invocation_metadata() or ()).get(metadata.REQUEST_ID, ""))

