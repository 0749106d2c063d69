"""Public GenerateRequests as pipeline requests, and a pipeline run as one whole
GenerateResponse: shared by the unary call, batch items and async jobs."""

from __future__ import annotations

import contextlib

import grpc

from genmesh.core.models.chat_template import ChatMessage
from genmesh.v1 import common_pb2, generation_pb2
from services.frontend.catalog import ModelCatalog
from services.frontend.errors import PipelineError
from services.frontend.events import Finished, Started, TextChunk
from services.frontend.pipeline import Pipeline, PipelineRequest


def pipeline_request(request: generation_pb2.GenerateRequest, *, catalog: ModelCatalog,
                     tenant: str, request_id: str, priority: common_pb2.Priority,
                     method: str) -> PipelineRequest:
    """The pipeline's request for ``request``; PipelineError (INVALID_ARGUMENT,
    NOT_FOUND) for one that cannot run."""
    model, version = catalog.resolve(request.model, request.model_version)
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
        request_id=request.request_id or request_id, model=model, model_version=version,
        prompt=prompt, messages=messages, params=request.params, priority=priority,
        skip_cache=request.skip_cache, tenant=tenant, method=method)


async def generate_whole(pipeline: Pipeline, req: PipelineRequest, *, timeout_s: float
                         ) -> generation_pb2.GenerateResponse:
    """Run ``req`` to the end; raises PipelineError."""
    reply = generation_pb2.GenerateResponse()
    parts = []
    async with contextlib.aclosing(pipeline.run(req, timeout_s=timeout_s)) as events:
        async for event in events:
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
