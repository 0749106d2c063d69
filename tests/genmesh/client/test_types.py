"""The SDK's errors: what a caller sees of a failed call."""

from __future__ import annotations

import grpc
import pytest

from genmesh.client.types import GenmeshError


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("code,details,expected", [
    # Envoy resets a stream whose frontend died mid-response: retryable.
    (grpc.StatusCode.INTERNAL, "Stream removed (RST_STREAM (Received RST_STREAM with error "
     "code 2))", grpc.StatusCode.UNAVAILABLE),
    (grpc.StatusCode.UNKNOWN, "Socket closed", grpc.StatusCode.UNAVAILABLE),
    # A server's own INTERNAL stays one.
    (grpc.StatusCode.INTERNAL, "generation failed: boom", grpc.StatusCode.INTERNAL),
    (grpc.StatusCode.INVALID_ARGUMENT, "Stream removed", grpc.StatusCode.INVALID_ARGUMENT),
])
def test_the_sdk_reports_a_dropped_stream_as_unavailable(code, details, expected):
    error = GenmeshError.from_rpc(_Failed(code, details))
    assert error.code == expected
    assert details in error.message
