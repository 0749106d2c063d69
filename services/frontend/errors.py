"""The frontend's request errors: what the public API reports, and how a downstream
service's failure is translated into one."""

from __future__ import annotations

import grpc

# Downstream codes that describe the caller's request: passed through as they are.
_CALLER_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED,
})


class PipelineError(Exception):
    """A failed request, as the public API reports it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def rpc_error(exc: grpc.aio.AioRpcError, service: str) -> PipelineError:
    """A downstream failure as the caller should see it."""
    code, details = exc.code(), exc.details() or ""
    if code in _CALLER_CODES:
        return PipelineError(code, details)
    if code == grpc.StatusCode.UNAVAILABLE:
        return PipelineError(code, f"the {service} is unavailable ({details}); retry shortly")
    return PipelineError(grpc.StatusCode.INTERNAL, f"the {service} failed: {details}")
