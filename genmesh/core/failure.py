"""What a service does when a store its limits depend on (Redis, the rate-limit service)
is down or too slow. One meaning for every limit: the deployment description names it."""

from __future__ import annotations

import re
from enum import StrEnum

import grpc


class FailureMode(StrEnum):
    OPEN = "open"  # admit the request without the limit, count it, warn
    CLOSED = "closed"  # refuse the request with UNAVAILABLE


# How grpc's details begin when the transport failed under a call (an optional
# "syscall:" prefix, e.g. "recvmsg:Connection reset by peer"). Envoy resets the stream of
# a backend that died mid-response: "Stream removed (RST_STREAM (Received RST_STREAM with
# error code 2))", INTERNAL. A proxy's HTTP error instead of a gRPC answer is one too.
_TRANSPORT_FAILURE = re.compile(
    r"(?:[a-z_]+:)?(?:Stream removed|Received RST_STREAM|Socket closed|Connection reset|"
    r"Broken pipe|GOAWAY received|Transport closed|Received http2 header with status)")


def is_transport_failure(code: grpc.StatusCode, details: str) -> bool:
    """A call failed because the connection or the stream under it broke (the peer died
    or reset it), not because the peer answered with an error: grpc reports that as
    INTERNAL or UNKNOWN with details of its own. Retryable: UNAVAILABLE is its meaning."""
    return (code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
            and _TRANSPORT_FAILURE.match(details) is not None)
