"""Response streams that end inside their own call.

grpc.aio runs a handler written as an async generator by iterating it itself. A call
cancelled (by its caller, or its deadline) while a message is being sent is cancelled
*outside* the generator, which grpc then leaves suspended at its ``yield``: Python closes
it later in a task of its own (the event loop's async-generator finalizer). Everything the
generator's ``finally`` and ``with`` blocks undo then runs late and in another context:
the spans made current in it cannot be detached there (OpenTelemetry logs "Failed to
detach context" with a traceback), and the work it cancels stops late.

Two interceptors around the others keep it in the call (``interceptors``):
- ``CloseStreams``, the first, turns the outermost handler into a coroutine that writes
  each message (``context.write``, the reader-writer API): a cancellation lands where it
  awaits, in the call's task, and the handler's generator is closed there before the call
  ends. The tracing interceptor's generator is that handler when tracing is on.
- ``RecordStreams``, the last, notes the servicer's own generator for ``CloseStreams`` to
  close as well: a wrapper between them (the tracing interceptor's) iterates it with a
  plain ``async for``, which leaves it open when the wrapper itself is closed.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any

import grpc

StreamBehavior = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]
HandlerFactory = Callable[..., grpc.RpcMethodHandler]

# The servicer generators opened in the current call: set by CloseStreams' coroutine for
# its call's task, appended to by RecordStreams' wrapper (None outside such a call).
_OPENED: ContextVar[list[AsyncGenerator[Any, None]] | None] = ContextVar(
    "genmesh_opened_streams", default=None)


def interceptors(inner: Sequence[grpc.aio.ServerInterceptor] = ()
                 ) -> tuple[grpc.aio.ServerInterceptor, ...]:
    """``inner`` (the tracing interceptor, say) between CloseStreams and RecordStreams."""
    return (CloseStreams(), *inner, RecordStreams())


def written(behavior: StreamBehavior) -> Callable[[Any, grpc.aio.ServicerContext],
                                                  Awaitable[None]]:
    """``behavior`` (an async-generator handler) as a coroutine handler that writes each
    of its messages, then closes it, and every servicer generator RecordStreams noted
    meanwhile, in the call's own task however the call ends."""
    async def write_each(request: Any, context: grpc.aio.ServicerContext) -> None:
        opened: list[AsyncGenerator[Any, None]] = []
        token = _OPENED.set(opened)
        try:
            async with contextlib.aclosing(behavior(request, context)) as replies:  # type: ignore[type-var]
                try:
                    async for reply in replies:
                        await context.write(reply)
                finally:
                    # The servicer's generators first (a no-op for one that has ended),
                    # while the wrappers around them still hold their context: the
                    # servicer's cleanup runs under the call's span.
                    for stream in reversed(opened):
                        await stream.aclose()
        finally:
            _OPENED.reset(token)

    return write_each


def recorded(behavior: StreamBehavior) -> StreamBehavior:
    """``behavior`` with each generator it opens noted for ``written`` to close."""
    async def stream(request: Any, context: grpc.aio.ServicerContext
                     ) -> AsyncGenerator[Any, None]:
        replies = behavior(request, context)
        opened = _OPENED.get()
        if opened is not None and isinstance(replies, AsyncGenerator):
            opened.append(replies)
        async for reply in replies:
            yield reply

    return stream


class _StreamWrapper(grpc.aio.ServerInterceptor):
    """Applies ``wrap`` to each async-generator handler of a response stream."""

    @staticmethod
    def wrap(behavior: StreamBehavior) -> Callable[..., Any]:
        raise NotImplementedError

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler
        make: HandlerFactory
        if handler.request_streaming:
            behavior, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        else:
            behavior, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        if not inspect.isasyncgenfunction(behavior):  # a coroutine already, or sync
            return handler
        return make(self.wrap(behavior), request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


class CloseStreams(_StreamWrapper):
    """The first interceptor: the outermost stream handler as ``written``'s coroutine."""

    wrap = staticmethod(written)


class RecordStreams(_StreamWrapper):
    """The last interceptor: the servicer's stream handlers as ``recorded``."""

    wrap = staticmethod(recorded)
