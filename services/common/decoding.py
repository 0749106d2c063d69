"""Requests that cannot be decoded end as INVALID_ARGUMENT, in every service.

grpc.aio decodes a request with the handler's deserializer before any code of ours runs;
a deserializer that raises (invalid UTF-8 in a string field, a truncated or corrupt
message) ends the call UNKNOWN ("Unexpected DecodeError ..."), as if the server had a
bug, and logs a traceback for what is the caller's mistake. ``DecodeRequests``, an
interceptor every server runs (``server.new_server``), wraps each deserializer so that it
returns an ``Undecodable`` instead of raising, and each handler so that it ends such a
call with INVALID_ARGUMENT before the servicer sees it: for a request stream, when the
servicer reaches the bad message (the messages before it were served).

Cost: nothing per response of a unary-request handler that is a coroutine; one more
generator step per message of a response stream, and of a request stream.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

# Most characters of the decoder's own words quoted back to the caller.
_MAX_REASON_CHARS = 200


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request message its deserializer refused, in place of the message."""

    reason: str  # the decoder's words, e.g. "Error parsing message with type ..."

    @property
    def details(self) -> str:
        return (f"the request message cannot be decoded ({self.reason[:_MAX_REASON_CHARS]}): "
                "a field holds invalid UTF-8, or the message is truncated or corrupt")


def decoding(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` returning an ``Undecodable`` where it would raise."""
    if deserializer is None:
        return None

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # DecodeError, and whatever a custom deserializer raises
            return Undecodable(str(exc) or type(exc).__name__)

    return decode


async def refuse(context: grpc.aio.ServicerContext, request: Undecodable) -> None:
    """End the call: INVALID_ARGUMENT naming what failed (``abort`` raises)."""
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)


async def checked_requests(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[Any]:
    """``requests`` as they come; the call ends INVALID_ARGUMENT at an undecodable one."""
    async for request in requests:
        if type(request) is Undecodable:
            await refuse(context, request)
        yield request


def _unary_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if type(request) is Undecodable:
            await refuse(context, request)
        return await behavior(request, context)
    return handle


def _stream_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handle(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        return await behavior(checked_requests(requests, context), context)
    return handle


def _streaming(behavior: Callable[..., Any], *, is_request_stream: bool) -> Callable[..., Any]:
    """A handler of a response stream, written either way grpc.aio takes one: as an
    async generator, or as a coroutine that writes (``streams.written``)."""
    def requests_of(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return checked_requests(request, context) if is_request_stream else request

    if inspect.iscoroutinefunction(behavior):
        async def write(request: Any, context: grpc.aio.ServicerContext) -> None:
            if type(request) is Undecodable:
                await refuse(context, request)
            await behavior(requests_of(request, context), context)
        return write

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if type(request) is Undecodable:
            await refuse(context, request)
        async for reply in behavior(requests_of(request, context), context):
            yield reply
    return stream


class DecodeRequests(grpc.aio.ServerInterceptor):
    """Every handler's deserializer as ``decoding``'s, and the handler refusing what it
    could not decode. Handlers that are not grpc.aio coroutines or async generators (none
    of ours) pass untouched."""

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        deserializer = decoding(handler.request_deserializer)
        serializer = handler.response_serializer
        if handler.request_streaming and handler.response_streaming:
            behavior = handler.stream_stream
            if not _is_async(behavior):
                return handler
            return grpc.stream_stream_rpc_method_handler(
                _streaming(behavior, is_request_stream=True),
                request_deserializer=deserializer, response_serializer=serializer)
        if handler.request_streaming:
            if not inspect.iscoroutinefunction(handler.stream_unary):
                return handler
            return grpc.stream_unary_rpc_method_handler(
                _stream_unary(handler.stream_unary),
                request_deserializer=deserializer, response_serializer=serializer)
        if handler.response_streaming:
            behavior = handler.unary_stream
            if not _is_async(behavior):
                return handler
            return grpc.unary_stream_rpc_method_handler(
                _streaming(behavior, is_request_stream=False),
                request_deserializer=deserializer, response_serializer=serializer)
        if not inspect.iscoroutinefunction(handler.unary_unary):
            return handler
        return grpc.unary_unary_rpc_method_handler(
            _unary_unary(handler.unary_unary),
            request_deserializer=deserializer, response_serializer=serializer)


def _is_async(behavior: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)
