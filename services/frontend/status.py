"""The one place where the frontend's errors become gRPC status codes.

``status_of`` maps an error to the code and message a caller sees; ``maps_errors`` wraps a
handler of the public API, unary or streaming, so that such an error ends the call with
that status. GenerateBatch items and async jobs record the same mapping in their results.
An error with no mapping is a bug: it is raised on (the call ends UNKNOWN, and is logged).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any, TypeVar, cast

import grpc

from genmesh.core import metadata
from services.frontend.errors import PipelineError
from services.frontend.jobs import InvalidJobId, JobConflict, JobStoreUnavailable, WatchTimeout

Handler = TypeVar("Handler", bound=Callable[..., Any])
# The longest status message sent (grpc-message is a trailer: one that passes the
# gateway's header limit resets the connection other calls share). Messages that quote
# the caller's strings quote them bounded (fields.py); this catches any other.
MAX_DETAILS_CHARS = 2048


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status a caller sees for ``exc``; None for an error that is a bug."""
    if isinstance(exc, PipelineError):
        return exc.code, exc.message
    if isinstance(exc, JobStoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE, f"the job store is unavailable ({exc}); retry shortly"
    if isinstance(exc, JobConflict):
        return grpc.StatusCode.ALREADY_EXISTS, str(exc)
    if isinstance(exc, InvalidJobId):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, WatchTimeout):
        return (grpc.StatusCode.DEADLINE_EXCEEDED,
                "the job did not end within the call's deadline; watch again")
    return None


def trailers_of(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata for ``exc``'s status: ``retry-after`` (whole seconds) when the
    error says when a retry can succeed, and the ``x-ratelimit-*`` of the limit that
    refused (a token budget), as the gateway's refusals carry them."""
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is None:
        return ()
    wait = str(max(1, math.ceil(retry_after_s)))
    trailers: tuple[tuple[str, str], ...] = ((metadata.RETRY_AFTER, wait),)
    rate_limit = getattr(exc, "rate_limit", None)
    if rate_limit is not None:
        limit, remaining = rate_limit
        trailers += ((metadata.RATE_LIMIT_LIMIT, str(limit)),
                     (metadata.RATE_LIMIT_REMAINING, str(remaining)),
                     (metadata.RATE_LIMIT_RESET, wait))
    return trailers


async def _abort(context: grpc.aio.ServicerContext, status: tuple[grpc.StatusCode, str],
                 exc: BaseException) -> None:
    """End the call with ``status`` (abort raises); trailers only when there are some,
    so a context without trailer support (tests' fakes) is called as before."""
    trailers = trailers_of(exc)
    code, details = status
    if len(details) > MAX_DETAILS_CHARS:
        details = details[:MAX_DETAILS_CHARS - 1] + "…"
    if trailers:
        await context.abort(code, details, trailing_metadata=trailers)
    else:
        await context.abort(code, details)


def maps_errors(handler: Handler) -> Handler:
    """``handler`` (a servicer method: ``(self, request or request iterator, context)``)
    ending the call with ``status_of`` its error."""
    if inspect.isasyncgenfunction(handler):
        @functools.wraps(handler)
        async def streaming(self: object, request: Any, context: grpc.aio.ServicerContext
                            ) -> AsyncGenerator[Any, None]:
            try:
                async with contextlib.aclosing(handler(self, request, context)) as replies:
                    async for reply in replies:
                        yield reply
            except Exception as exc:
                status = status_of(exc)
                if status is None:
                    raise
                await _abort(context, status, exc)

        return cast(Handler, streaming)

    @functools.wraps(handler)
    async def unary(self: object, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await cast(Callable[..., Coroutine[Any, Any, Any]], handler)(
                self, request, context)
        except Exception as exc:
            status = status_of(exc)
            if status is None:
                raise
            await _abort(context, status, exc)
            raise AssertionError("unreachable: abort raises") from exc

    return cast(Handler, unary)
