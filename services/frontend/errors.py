"""The frontend's request errors: what the public API reports, and how a downstream
service's failure is translated into one."""

from __future__ import annotations

import grpc

from genmesh.core import failure

# Downstream codes that describe the caller's request: passed through as they are.
_CALLER_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED,
})


class PipelineError(Exception):
    """A failed request, as the public API reports it."""

    def __init__(self, code: grpc.StatusCode, message: str, *,
                 retry_after_s: float | None = None,
                 rate_limit: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # When a retry can succeed (a token budget's window resets): sent to the caller
        # as the ``retry-after`` trailer, whole seconds rounded up. None: not known.
        self.retry_after_s = retry_after_s
        # The limit that refused, as (limit, remaining): sent as the x-ratelimit-limit,
        # -remaining and -reset (= retry-after) trailers, as the gateway's refusals do.
        self.rate_limit = rate_limit


def is_transport_failure(exc: grpc.aio.AioRpcError) -> bool:
    """The call failed because the connection or the stream under it broke (the
    service died or reset it), not because the service answered with an error: grpc
    reports that as INTERNAL or UNKNOWN with details of its own."""
    return failure.is_transport_failure(exc.code(), exc.details() or "")


def rpc_error(exc: grpc.aio.AioRpcError, service: str) -> PipelineError:
    """A downstream failure as the caller should see it: the caller's own mistakes as
    they are, a service that is down or went away mid-call as UNAVAILABLE (retryable),
    and only a service's own failure as INTERNAL."""
    code, details = exc.code(), exc.details() or ""
    if code in _CALLER_CODES:
        return PipelineError(code, details)
    if code == grpc.StatusCode.UNAVAILABLE or is_transport_failure(exc):
        return PipelineError(grpc.StatusCode.UNAVAILABLE,
                             f"the {service} is unavailable ({details}); retry shortly")
    return PipelineError(grpc.StatusCode.INTERNAL, f"the {service} failed: {details}")
