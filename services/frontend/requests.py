"""Public GenerateRequests as pipeline requests, and a pipeline run as one whole
GenerateResponse: shared by the unary call, batch items and async jobs."""

from __future__ import annotations

import contextlib

import grpc

from genmesh.core.models.chat_template import ChatMessage
from genmesh.v1 import common_pb2, generation_pb2
from services.frontend.catalog import ModelCatalog
from services.frontend.choices import MAX_NUM_CHOICES
from services.frontend.errors import PipelineError
from services.frontend.events import Finished, Started, TextChunk
from services.frontend.fields import check_name, check_roles
from services.frontend.pipeline import Pipeline, PipelineRequest
from services.frontend.tools import chat_messages, constraint, tools_of

_PRIORITIES = frozenset(common_pb2.Priority.values())


def pipeline_request(request: generation_pb2.GenerateRequest, *, catalog: ModelCatalog,
                     tenant: str, request_id: str, priority: common_pb2.Priority,
                     method: str) -> PipelineRequest:
    """The pipeline's request for ``request``, at ``priority`` unless it names its own;
    PipelineError (INVALID_ARGUMENT, NOT_FOUND) for one that cannot run."""
    # The caller's request_id travels to the worker as the x-request-id header, whose
    # value gRPC takes only as printable ASCII (anything else failed the call inside grpc,
    # with no status until the deadline); a version, as x-genmesh-model-version.
    check_name("model", request.model)
    check_name("model_version", request.model_version)
    check_name("request_id", request.request_id, what=" (it is sent as a header)")
    check_roles("chat.messages", (m.role for m in request.chat.messages))
    model, version = catalog.resolve(request.model, request.model_version)
    kind = request.WhichOneof("input")
    messages: tuple[ChatMessage, ...] = ()
    if kind == "prompt" and request.prompt:
        prompt = request.prompt
    elif kind == "chat" and request.chat.messages:
        prompt = None
        messages = chat_messages(request.chat.messages)
    else:
        raise PipelineError(grpc.StatusCode.INVALID_ARGUMENT,
                            "set a non-empty prompt or chat.messages")
    if not 0 <= request.n <= MAX_NUM_CHOICES:
        raise PipelineError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"n: must be in [0, {MAX_NUM_CHOICES}] (0 means 1), got {request.n}")
    if request.priority not in _PRIORITIES:
        raise PipelineError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"priority: unknown value {request.priority}; use one of "
                            f"{', '.join(common_pb2.Priority.keys())}")
    tools = tools_of(request)
    params = request.params
    if tools is not None and (forced := constraint(tools)) is not None:
        if params.HasField("constraint"):
            raise PipelineError(grpc.StatusCode.INVALID_ARGUMENT,
                                "tool_choice: a required or named choice shapes the output, "
                                "as params.constraint does: set one")
        params = common_pb2.SamplingParams()
        params.CopyFrom(request.params)
        params.constraint.CopyFrom(forced)
    return PipelineRequest(
        request_id=request.request_id or request_id, model=model, model_version=version,
        prompt=prompt, messages=messages, params=params,
        priority=request.priority or priority, skip_cache=request.skip_cache, tenant=tenant,
        method=method, n=request.n or 1,
        tools=tools if tools is not None and tools.is_shown else None)


async def generate_whole(pipeline: Pipeline, req: PipelineRequest, *, timeout_s: float
                         ) -> generation_pb2.GenerateResponse:
    """Run ``req`` to the end; raises PipelineError."""
    reply = generation_pb2.GenerateResponse()
    choices = [_Choice() for _ in range(req.n)]
    async with contextlib.aclosing(pipeline.run(req, timeout_s=timeout_s)) as events:
        async for event in events:
            if isinstance(event, Started):
                reply.model = event.model
                reply.model_version = event.model_version
                reply.request_id = event.request_id
            elif isinstance(event, TextChunk):
                choice = choices[event.index]
                choice.parts.append(event.text)
                choice.logprobs += (c.logprob for c in event.logprobs)
            elif isinstance(event, Finished):
                choices[event.index].finished = event
    first = choices[0]
    reply.text = "".join(first.parts)
    reply.logprobs.extend(first.logprobs)
    reply.finish_reason = first.finished.finish_reason
    reply.finish_detail = first.finished.detail
    reply.tool_calls.extend(first.finished.tool_calls)
    if req.n == 1:
        reply.usage.CopyFrom(first.finished.usage)
        return reply
    for index, choice in enumerate(choices):
        reply.choices.add(index=index, text="".join(choice.parts),
                          finish_reason=choice.finished.finish_reason,
                          finish_detail=choice.finished.detail, logprobs=choice.logprobs,
                          usage=choice.finished.usage, tool_calls=choice.finished.tool_calls)
    # The prompt once, as the first choice ran it; every choice's completion.
    reply.usage.CopyFrom(first.finished.usage)
    reply.usage.completion_tokens = sum(c.finished.usage.completion_tokens for c in choices)
    return reply


class _Choice:
    """One choice's answer as its events come."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.logprobs: list[generation_pb2.OutputLogprob] = []
        self.finished = Finished(common_pb2.FINISH_REASON_UNSPECIFIED)  # until it finishes
