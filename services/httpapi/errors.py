"""The one place where the HTTP API's failures become HTTP responses: OpenAI-shaped
JSON errors (``{"error": {"message", "type", "param", "code"}}``) with the status code
OpenAI's clients act on, whether the failure is the HTTP request's own (bad JSON, an
unknown field) or a status the frontend answered with.

| frontend status | HTTP | type / code |
| --- | --- | --- |
| INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE | 400 | invalid_request_error |
| PERMISSION_DENIED (the prompt was blocked) | 400 | invalid_request_error / content_filter |
| UNAUTHENTICATED | 401 | invalid_request_error / invalid_api_key |
| NOT_FOUND | 404 | invalid_request_error / model_not_found |
| RESOURCE_EXHAUSTED (a token budget) | 429 | tokens / rate_limit_exceeded (+ retry-after) |
| DEADLINE_EXCEEDED | 504 | timeout |
| UNAVAILABLE | 503 | server_error / service_unavailable (+ retry-after: 1) |
| anything else (INTERNAL, UNKNOWN) | 500 | server_error |
"""

from __future__ import annotations

import grpc

from genmesh.core import metadata

# What a refusal's trailers say about the limit, passed on as the response's headers.
_LIMIT_TRAILERS = (metadata.RETRY_AFTER, metadata.RATE_LIMIT_LIMIT,
                   metadata.RATE_LIMIT_REMAINING, metadata.RATE_LIMIT_RESET)
# Seconds a client should wait before retrying a service that is down.
UNAVAILABLE_RETRY_AFTER_S = 1


class ApiError(Exception):
    """A request that failed, as the HTTP API reports it."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 for a request this API cannot take as it is."""
    return ApiError(400, message, param=param, code=code)


def from_rpc(exc: grpc.aio.AioRpcError) -> ApiError:
    """The HTTP error for a status the frontend answered with."""
    code, details = exc.code(), exc.details() or ""
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.OUT_OF_RANGE):
        return ApiError(400, details, param=_param_of(details))
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return ApiError(400, details, code="content_filter")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ApiError(401, "missing or unknown API key: send it as 'Authorization: Bearer "
                             "<key>' (or the 'x-api-key' header)", code="invalid_api_key")
    if code == grpc.StatusCode.NOT_FOUND:
        return ApiError(404, details, code="model_not_found", param="model")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        trailers = dict(exc.trailing_metadata() or ())
        headers = {name: str(trailers[name]) for name in _LIMIT_TRAILERS if name in trailers}
        return ApiError(429, details, type="tokens", code="rate_limit_exceeded",
                        headers=headers)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ApiError(504, "the request took longer than its deadline", type="timeout",
                        code="timeout")
    if code == grpc.StatusCode.UNAVAILABLE:
        return ApiError(503, details or "the service is unavailable; retry shortly",
                        type="server_error", code="service_unavailable",
                        headers={"retry-after": str(UNAVAILABLE_RETRY_AFTER_S)})
    return ApiError(500, f"the server failed ({code.name}): {details}", type="server_error",
                    code="internal_error")


def _param_of(details: str) -> str | None:
    """The request field a frontend INVALID_ARGUMENT names, when it starts with one
    (``"max_tokens must be ..."``); None otherwise."""
    word = details.split(" ", 1)[0].strip(":'\"")
    return word if word.replace("_", "").isalnum() and "_" in word else None
