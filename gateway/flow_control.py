"""What keeps one call from hurting the others on a shared connection: HTTP/2 windows,
stream limits, per-connection buffers and protocol errors, on both listeners and every
upstream cluster.

- **A protocol error resets one stream.** Without ``override_stream_error_on_invalid_http_
  message`` Envoy answers an invalid message (headers over the limit, a malformed header)
  by closing the whole HTTP/2 connection: a 100 KB string echoed in one call's trailers
  reset every stream of the connection Envoy shares with the frontend (issue 20).
- **A stalled stream cannot stall its connection.** Envoy grants a peer window only as
  it forwards what it received, so a stream whose reader does not read holds at most
  ``STREAM_WINDOW_BYTES`` of its connection's window. Each connection's window is at least
  its stream limit times that: every stream of a connection may be stalled and the
  others (none left) still flow; fewer stalled streams never exhaust it.
- **Buffers are bounded**: ``per_connection_buffer_limit_bytes`` on each listener and
  cluster (per stream in the HTTP connection manager); the edge takes Envoy's edge
  recommendation (32 KiB), the mesh more, so that its retried and mirrored calls (whose
  body Envoy must hold) keep being retried and mirrored with a long prompt's token ids.
"""

from __future__ import annotations

from typing import Any

from gateway.core import duration

STREAM_WINDOW_BYTES = 64 * 1024  # per stream, each direction (Envoy's default: 256 MiB)
EDGE_MAX_STREAMS = 256  # concurrent streams of one client connection
MESH_MAX_STREAMS = 1024  # of one frontend channel (its grpc queues calls past this)
UPSTREAM_MAX_STREAMS = 256  # per upstream connection; Envoy opens another past it
EDGE_BUFFER_BYTES = 32 * 1024
MESH_BUFFER_BYTES = 256 * 1024  # the mesh listener and every cluster
REQUEST_HEADERS_TIMEOUT_S = 10.0  # a request's headers must arrive within this
CONNECTION_IDLE_TIMEOUT_S = 3600.0  # a connection with no stream is closed after this


def http2_options(max_concurrent_streams: int) -> dict[str, Any]:
    """HTTP/2 settings of one side of a connection: ``max_concurrent_streams`` streams
    of ``STREAM_WINDOW_BYTES`` each, a connection window that holds them all, and a
    stream reset (never a connection reset) for an invalid message."""
    return {
        "max_concurrent_streams": max_concurrent_streams,
        "initial_stream_window_size": STREAM_WINDOW_BYTES,
        "initial_connection_window_size": max_concurrent_streams * STREAM_WINDOW_BYTES,
        "override_stream_error_on_invalid_http_message": True,
    }


def downstream_options(*, is_edge: bool) -> dict[str, Any]:
    """The HTTP connection manager's fields for a listener's clients."""
    return {
        "stream_error_on_invalid_http_message": True,  # HTTP/1.1 too: 400, not a close
        "http2_protocol_options": http2_options(
            EDGE_MAX_STREAMS if is_edge else MESH_MAX_STREAMS),
        "request_headers_timeout": duration(REQUEST_HEADERS_TIMEOUT_S),
        "common_http_protocol_options": {"idle_timeout": duration(CONNECTION_IDLE_TIMEOUT_S)},
    }


def listener_buffer_bytes(*, is_edge: bool) -> int:
    return EDGE_BUFFER_BYTES if is_edge else MESH_BUFFER_BYTES
