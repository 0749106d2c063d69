"""Listeners, their HTTP connection managers and gRPC routes.

Timeouts: every route has ``timeout: 0s`` (no Envoy deadline: a generation stream may
last minutes); the caller's own gRPC deadline rules (see ``route``). A stream that
sends nothing in either direction for ``stream_idle_timeout`` is reset.

Unknown paths: the last route of each listener answers every other path itself with
HTTP 404, which a gRPC client sees as UNIMPLEMENTED with a message naming the services
this listener serves, so a typo or a service that is not deployed reads as such.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.core import duration, socket_address, typed

RESOURCE_EXHAUSTED = 8  # grpc-status code


def listener(name: str, *, host: str, port: int, manager: dict[str, Any]) -> dict[str, Any]:
    """A TCP listener whose only filter is the HTTP connection manager ``manager``."""
    return {
        "name": name,
        "address": socket_address(host, port),
        "filter_chains": [{
            "filters": [{"name": "envoy.filters.network.http_connection_manager",
                         "typed_config": manager}],
        }],
    }


def http_connection_manager(
    name: str,
    *,
    routes: Sequence[dict[str, Any]],
    is_edge: bool,
    max_request_bytes: int | None,
    stream_idle_timeout_s: float,
    max_request_headers_kb: int,
    access_log: bool,
) -> dict[str, Any]:
    """HTTP/1.1 or HTTP/2 (gRPC) downstream, one virtual host matching any authority.

    Every request carries an ``x-request-id``: kept when the caller sent one (the frontend
    forwards the edge's id on its mesh calls, clients may bring their own), generated
    otherwise. The edge also returns it in the response headers so a client can quote it.
    ``max_request_bytes`` (None: unlimited) bounds the request body of each call.
    """
    http_filters = [router_filter()]
    if max_request_bytes is not None:
        http_filters.insert(0, body_size_limit(max_request_bytes))
    manager = typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix=name,
        codec_type="AUTO",
        route_config={
            "name": name,
            "virtual_hosts": [{"name": name, "domains": ["*"], "routes": list(routes)}],
        },
        http_filters=http_filters,
        generate_request_id=True,
        stream_idle_timeout=duration(stream_idle_timeout_s),
        max_request_headers_kb=max_request_headers_kb,
    )
    if is_edge:
        manager |= {
            # Clients connect directly: their address is the peer address, not X-F-F.
            "use_remote_address": True,
            # Without this an edge request's id would be replaced by a fresh one.
            "preserve_external_request_id": True,
            "always_set_request_id_in_response": True,
        }
    if max_request_bytes is not None:
        manager["local_reply_config"] = {"mappers": [payload_too_large(max_request_bytes)]}
    if access_log:
        manager["access_log"] = [json_access_log(name)]
    return manager


def route(prefix: str, cluster: str) -> dict[str, Any]:
    """Send every path starting with ``prefix`` to ``cluster``. No Envoy timeout: the
    caller's gRPC deadline rules. Envoy forwards ``grpc-timeout`` to the backend, and the
    client's own timer ends the call. (Letting Envoy enforce the header too would race
    the client: a stream whose headers were sent is then reset, and the client reads
    INTERNAL instead of DEADLINE_EXCEEDED.)"""
    return {
        "match": {"prefix": prefix},
        "route": {"cluster": cluster, "timeout": "0s"},
    }


def worker_route(cluster: str) -> dict[str, Any]:
    """The ``genmesh.v1.Worker`` route. Kept apart: version splits, shadow mirroring and
    prefix-affinity hashing of model versions are added here."""
    return route("/genmesh.v1.Worker/", cluster)


def unrouted(listener_name: str, services: Sequence[str]) -> dict[str, Any]:
    """Answer any other path with 404 (gRPC: UNIMPLEMENTED) and say what is served."""
    message = f"genmesh {listener_name}: no route for this path; served here: {', '.join(services)}"
    return {
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": message}},
    }


def body_size_limit(max_request_bytes: int) -> dict[str, Any]:
    """Fail a call once its request body passes ``max_request_bytes`` (HTTP 413).

    The filter counts bytes as they stream through, it buffers nothing: a unary or
    server-streaming call is limited to one request message of that size (plus gRPC's
    5-byte frame header), a bidi stream to that many bytes over its whole life. Envoy logs
    each rejection at level ``error``.
    """
    return {
        "name": "envoy.filters.http.body_size_limit",
        "typed_config": typed("envoy.extensions.filters.http.body_size_limit.v3.BodySizeLimit",
                              max_request_bytes=max_request_bytes),
    }


def payload_too_large(max_request_bytes: int) -> dict[str, Any]:
    """Turn the body limit's 413 into RESOURCE_EXHAUSTED, what a gRPC server itself answers
    to an oversized message (Envoy's own mapping of 413 is UNKNOWN), with the limit."""
    message = (f"request larger than {max_request_bytes} bytes, the gateway's limit "
               "(max_request_bytes)")
    return {
        "filter": {"status_code_filter": {"comparison": {
            "op": "EQ",
            "value": {"default_value": 413, "runtime_key": "genmesh.payload_too_large_code"},
        }}},
        "body": {"inline_string": message},
        "headers_to_add": [{
            "header": {"key": "grpc-status", "value": str(RESOURCE_EXHAUSTED)},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }],
    }


def router_filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": typed("envoy.extensions.filters.http.router.v3.Router"),
    }


def json_access_log(listener_name: str) -> dict[str, Any]:
    """One JSON line per call on Envoy's stdout."""
    fields = {
        "listener": listener_name,
        "start_time": "%START_TIME%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(:PATH)%",
        "grpc_status": "%GRPC_STATUS(NUMBER)%",
        "http_status": "%RESPONSE_CODE%",
        "response_flags": "%RESPONSE_FLAGS%",
        "details": "%RESPONSE_CODE_DETAILS%",
        "duration_ms": "%DURATION%",
        "bytes_received": "%BYTES_RECEIVED%",
        "bytes_sent": "%BYTES_SENT%",
        "upstream_cluster": "%UPSTREAM_CLUSTER%",
        "upstream_host": "%UPSTREAM_HOST%",
        "request_id": "%REQ(X-REQUEST-ID)%",
    }
    return {
        "name": "envoy.access_loggers.stdout",
        "typed_config": typed("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                              log_format={"json_format": fields}),
    }
