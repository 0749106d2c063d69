"""The OpenAI-compatible HTTP API: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``, as a Starlette app over the frontend's gRPC ``Generation`` service.

Envoy's edge sits in front: it has matched the caller's key (``Authorization: Bearer``
or ``x-api-key``), applied the tenant's rate limits and stamped the tenant header, which
this app forwards with the request id and the trace context. Everything else (token
budgets, safety, the response cache, rollout, the worker) is the frontend's pipeline,
the same one gRPC clients get.

A choice is one frontend call: ``n`` choices are ``n`` calls side by side (the worker's
prefix cache shares their prompt's KV blocks). A streamed answer starts (HTTP 200) only
once every choice's first message came back, so a refusal (a bad field, the token
budget, a blocked prompt) is an HTTP error status, not an event in a started stream; an
error after that ends the stream with an ``error`` event. A client that goes away, while
streaming or while waiting for a whole answer, cancels its calls, and the frontend
cancels the worker's request (its KV blocks are freed within a step).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from opentelemetry import propagate, trace
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from genmesh.core import metadata
from genmesh.v1 import generation_pb2, generation_pb2_grpc
from services.common.telemetry import (
    GEN_AI_OPERATION,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_SYSTEM,
    SYSTEM,
    tracer,
)
from services.httpapi import metrics, responses
from services.httpapi.errors import ApiError, from_rpc
from services.httpapi.schema import Parsed, chat_request, completion_request, parse_json

log = logging.getLogger("genmesh.httpapi")
_tracer = tracer(__name__)
T = TypeVar("T")

_STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class HttpApi:
    """Owns the frontend stub and whether the service still takes requests."""

    def __init__(self, frontend: generation_pb2_grpc.GenerationStub, *, max_request_s: float,
                 max_body_bytes: int) -> None:
        self.frontend = frontend
        self.max_request_s = max_request_s
        self.max_body_bytes = max_body_bytes
        self.is_draining = False

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self._endpoint("chat", self.chat), methods=["POST"]),
            Route("/v1/completions", self._endpoint("completions", self.completions),
                  methods=["POST"]),
            Route("/v1/models", self._endpoint("models", self.models), methods=["GET"]),
            Route("/v1/models/{model:path}", self._endpoint("model", self.model),
                  methods=["GET"]),
            Route("/healthz", self.health, methods=["GET"]),
        ]
        return Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})

    def drain(self) -> None:
        """Stop taking requests: the health check says 503 so the gateway stops sending."""
        self.is_draining = True

    # ---- endpoints ------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.is_draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "serving"})

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat_request(await self._body(request)),
                                    is_chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, completion_request(await self._body(request)),
                                    is_chat=False)

    async def models(self, request: Request) -> Response:
        reply = await self._unary(request, self.frontend.ListModels(
            generation_pb2.ListModelsRequest(), metadata=_metadata(request),
            timeout=self.max_request_s))
        return JSONResponse({"object": "list",
                             "data": [_model_object(m) for m in reply.models]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        reply = await self._unary(request, self.frontend.ListModels(
            generation_pb2.ListModelsRequest(), metadata=_metadata(request),
            timeout=self.max_request_s))
        for m in reply.models:
            if m.name == name:
                return JSONResponse(_model_object(m))
        raise ApiError(404, f"the model {name!r} does not exist; GET /v1/models lists them",
                       code="model_not_found", param="model")

    # ---- generation -----------------------------------------------------------------

    async def _generate(self, request: Request, parsed: Parsed, *, is_chat: bool
                        ) -> Response:
        env = responses.Envelope(
            id=("chatcmpl-" if is_chat else "cmpl-") + uuid.uuid4().hex,
            created=int(time.time()), model=parsed.model, is_chat=is_chat)
        trace.get_current_span().set_attribute(GEN_AI_REQUEST_MODEL, parsed.model)
        md = _metadata(request)
        with_logprobs = parsed.request.params.return_logprobs
        if not parsed.stream:
            reply = await self._unary(request, self.frontend.Generate(
                parsed.request, metadata=md, timeout=self.max_request_s))
            choices = [responses.ChoiceOut(c.index, c.text, c.finish_reason, c.logprobs,
                                           c.tool_calls) for c in reply.choices] or [
                responses.ChoiceOut(0, reply.text, reply.finish_reason, reply.logprobs,
                                    reply.tool_calls)]
            return JSONResponse(responses.whole(env, choices, [reply.usage],
                                                with_logprobs=with_logprobs))
        stream = self.frontend.GenerateStream(parsed.request, metadata=md,
                                              timeout=self.max_request_s)
        first = await self._answer(request, _first(stream), stream)
        metrics.TIME_TO_FIRST_BYTE.labels(env.object).observe(
            time.perf_counter() - request.state.started)
        return StreamingResponse(
            _events(env, stream, first, num_choices=max(parsed.request.n, 1),
                    include_usage=parsed.include_usage,
                    with_logprobs=with_logprobs),
            media_type="text/event-stream", headers=_STREAM_HEADERS)

    async def _unary(self, request: Request, call: grpc.aio.UnaryUnaryCall) -> Any:
        return await self._answer(request, call, call)

    async def _answer(self, request: Request, answer: Awaitable[T], call: grpc.aio.Call
                      ) -> T:
        """``answer`` (an await on ``call``), or ApiError for the status ``call`` failed
        with; ``call`` is cancelled when it fails or the client goes away meanwhile."""
        result = asyncio.ensure_future(answer)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((result, gone), return_when=asyncio.FIRST_COMPLETED)
            if not result.done():
                raise ApiError(499, "the client closed the request")
            return result.result()
        except grpc.aio.AioRpcError as exc:
            raise from_rpc(exc) from None
        finally:
            gone.cancel()
            if not result.done() or result.cancelled() or result.exception() is not None:
                result.cancel()
                call.cancel()

    async def _body(self, request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _too_large(self.max_body_bytes)
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > self.max_body_bytes:
                raise _too_large(self.max_body_bytes)
        return parse_json(bytes(raw))

    def _endpoint(self, name: str, handler: Callable[[Request], Awaitable[Response]]
                  ) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` with its span, its metrics, and its errors as OpenAI-shaped JSON
        (the one place an ApiError becomes a response)."""
        async def endpoint(request: Request) -> Response:
            request.state.started = time.perf_counter()
            context = propagate.extract(dict(request.headers))
            with _tracer.start_as_current_span(
                    f"{request.method} {request.url.path}", context=context,
                    kind=trace.SpanKind.SERVER) as span:
                span.set_attribute(GEN_AI_SYSTEM, SYSTEM)
                span.set_attribute(GEN_AI_OPERATION, name)
                metrics.IN_FLIGHT.inc()
                try:
                    response = await handler(request)
                except ApiError as exc:
                    response = error_response(exc)
                finally:
                    metrics.IN_FLIGHT.dec()
                span.set_attribute("http.response.status_code", response.status_code)
                metrics.REQUESTS.labels(name, str(response.status_code)).inc()
                metrics.DURATION.labels(name).observe(
                    time.perf_counter() - request.state.started)
                return response
        return endpoint


def error_response(exc: ApiError) -> JSONResponse:
    if exc.status >= 500:
        log.warning("request failed", extra={"status": exc.status, "error": exc.message})
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 (no route, wrong method), OpenAI-shaped."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = (f"no such endpoint: {request.method} {request.url.path}; served: "
                   "POST /v1/chat/completions, POST /v1/completions, GET /v1/models")
    else:
        message = f"{request.method} is not allowed on {request.url.path}"
    return error_response(ApiError(exc.status_code, message, code="unknown_url"
                                   if exc.status_code == 404 else "method_not_allowed"))


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes",
                    code="request_too_large")


def _metadata(request: Request) -> tuple[tuple[str, str], ...]:
    """What the frontend call carries: the tenant the gateway stamped, the request id
    and the trace context."""
    pairs = []
    tenant = request.headers.get(metadata.TENANT)
    if tenant:
        pairs.append((metadata.TENANT, tenant))
    request_id = request.headers.get(metadata.REQUEST_ID)
    if request_id:
        pairs.append((metadata.REQUEST_ID, request_id))
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return (*pairs, *carrier.items())


def _model_object(m: generation_pb2.ModelInfo) -> dict[str, Any]:
    return {"id": m.name, "object": "model", "created": 0, "owned_by": "genmesh",
            "max_model_len": m.max_model_len}


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away (the body was read before)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _first(stream: grpc.aio.UnaryStreamCall) -> generation_pb2.GenerateStreamResponse:
    """A stream's first message (an empty one if it ended without any)."""
    msg = await stream.read()
    if msg is grpc.aio.EOF:
        return generation_pb2.GenerateStreamResponse()
    return msg  # type: ignore[no-any-return]


async def _events(env: responses.Envelope, stream: grpc.aio.UnaryStreamCall,
                  first: generation_pb2.GenerateStreamResponse, *, num_choices: int,
                  include_usage: bool, with_logprobs: bool) -> AsyncIterator[bytes]:
    """The SSE body: each choice's chunks as they come (the frontend interleaves the
    choices, each message naming its ``index``), then the usage (when asked for) and
    ``[DONE]``; an ``error`` event ends a failed stream. With tools, the frontend has
    parsed the calls out of the text: they come whole on a choice's last message and go
    out as one delta before its finish."""
    usages: list[Any] = []
    try:
        if env.is_chat:
            for i in range(num_choices):
                yield responses.sse(responses.chunk(env, i, text="", role=True))
        msg = first
        while True:
            index = msg.index
            if msg.text:
                tokens = msg.logprobs if with_logprobs else None
                yield responses.sse(responses.chunk(env, index, text=msg.text, tokens=tokens))
            if msg.tool_calls:
                yield responses.sse(responses.chunk(env, index, calls=msg.tool_calls))
            if msg.finish_reason:
                usages.append(msg.usage)
                finish = ("tool_calls" if msg.tool_calls
                          else responses.finish_reason(msg.finish_reason))
                yield responses.sse(responses.chunk(env, index, finish=finish))
                if len(usages) == num_choices:
                    break
            msg = await stream.read()
            if msg is grpc.aio.EOF:
                raise ApiError(503, "the frontend's stream ended before every choice "
                                    "finished; retry", type="server_error",
                               code="service_unavailable")
        if include_usage:
            yield responses.sse(responses.usage_chunk(env, usages))
        yield responses.SSE_DONE
    except grpc.aio.AioRpcError as exc:
        error = from_rpc(exc)
        log.warning("stream failed", extra={"status": error.status, "error": error.message})
        yield responses.sse(error.body())
    except ApiError as error:
        log.warning("stream failed", extra={"status": error.status, "error": error.message})
        yield responses.sse(error.body())
    finally:
        stream.cancel()
