"""Listeners, their HTTP connection managers and gRPC routes.

A stream that sends nothing in either direction for ``stream_idle_timeout`` is reset.
Envoy's own replies (a limit, a backend it cannot reach) are rewritten by
``local_reply_config``: on the HTTP API's paths into OpenAI's error object, on every other
path into the gRPC status a gRPC server itself would have answered.
Routes are built in ``gateway/routes.py``; a listener either carries them inline (the
static rendering that ``envoy --mode validate`` checks) or subscribes to them as an RDS
file, which is how a live mesh changes its routes without touching its connections.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.core import duration, socket_address, typed
from gateway.flow_control import downstream_options, listener_buffer_bytes
from gateway.ratelimits import LOCAL_REFUSAL_MESSAGE

RESOURCE_EXHAUSTED = 8  # grpc-status code
# Response flags of a request Envoy could not deliver to its upstream: no healthy host,
# connection failed, circuit breaker open, reset or closed before the response headers.
UPSTREAM_UNAVAILABLE_FLAGS = ("UH", "UF", "UO", "UR", "UC")
# Envoy's response code details of a request its local rate-limit filter refused.
LOCAL_RATE_LIMITED = "local_rate_limited"


def listener(name: str, *, host: str, port: int, manager: dict[str, Any],
             is_inbound: bool = False,
             transport_socket: dict[str, Any] | None = None) -> dict[str, Any]:
    """A TCP listener whose only filter is the HTTP connection manager ``manager``.

    ``is_inbound`` marks the edge (``traffic_direction: INBOUND``): Envoy's admin
    ``/drain_listeners?inboundonly`` then stops it alone, and the mesh listener keeps
    carrying the in-flight streams' calls while the mesh stops, and takes the edge's
    smaller per-stream buffers (``gateway/flow_control.py``). ``transport_socket``: TLS
    (``gateway/tls.py``); None: plaintext."""
    config: dict[str, Any] = {"name": name, "address": socket_address(host, port)}
    if is_inbound:
        config["traffic_direction"] = "INBOUND"
    config["per_connection_buffer_limit_bytes"] = listener_buffer_bytes(is_edge=is_inbound)
    chain: dict[str, Any] = {
        "filters": [{"name": "envoy.filters.network.http_connection_manager",
                     "typed_config": manager}],
    }
    if transport_socket is not None:
        chain["transport_socket"] = transport_socket
    config["filter_chains"] = [chain]
    return config


def http_connection_manager(
    name: str,
    *,
    routes: dict[str, Any],
    extra_filters: Sequence[dict[str, Any]] = (),
    is_edge: bool,
    max_request_bytes: int | None,
    stream_idle_timeout_s: float,
    max_request_headers_kb: int,
    access_log: bool,
    tracing: dict[str, Any] | None = None,
    http_api_prefix: str | None = None,
) -> dict[str, Any]:
    """HTTP/1.1 or HTTP/2 (gRPC) downstream, one virtual host matching any authority.

    A malformed request resets its own stream, and a client that does not read stalls
    only its own streams (``gateway/flow_control.py``).
    Every request carries an ``x-request-id``: kept when the caller sent one (the frontend
    forwards the edge's id on its mesh calls, clients may bring their own), generated
    otherwise. The edge also returns it in the response headers so a client can quote it.
    ``max_request_bytes`` (None: unlimited) bounds the request body of each call.
    ``routes`` is ``{"route_config": {...}}`` (inline) or ``{"rds": {...}}`` (a
    subscription); ``extra_filters`` run before the router (the edge's rate limits).
    ``tracing``: the HCM's tracing block (``otel_tracing``), or None for no spans.
    ``http_api_prefix``: the paths of the OpenAI-compatible HTTP API (``/v1/``), whose
    local replies become OpenAI error objects (``http_api_errors``); None: none served.
    """
    http_filters = [*extra_filters, router_filter()]
    if max_request_bytes is not None:
        http_filters.insert(0, body_size_limit(max_request_bytes))
    manager = typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix=name,
        codec_type="AUTO",
        **routes,
        http_filters=http_filters,
        generate_request_id=True,
        stream_idle_timeout=duration(stream_idle_timeout_s),
        max_request_headers_kb=max_request_headers_kb,
        **downstream_options(is_edge=is_edge),
    )
    if is_edge:
        manager |= {
            # Clients connect directly: their address is the peer address, not X-F-F.
            "use_remote_address": True,
            # Without this an edge request's id would be replaced by a fresh one.
            "preserve_external_request_id": True,
            "always_set_request_id_in_response": True,
        }
    # The first mapper whose filter matches rewrites the reply: the HTTP API's come first.
    mappers = ([] if http_api_prefix is None
               else http_api_errors(http_api_prefix, max_request_bytes))
    if max_request_bytes is not None:
        mappers.append(payload_too_large(max_request_bytes))
    if is_edge:
        mappers += [local_rate_limited(), rate_limit_service_down()]
    if mappers:
        manager["local_reply_config"] = {"mappers": mappers}
    if access_log:
        manager["access_log"] = [json_access_log(name)]
    if tracing is not None:
        manager["tracing"] = tracing
    return manager


def otel_tracing(service_name: str, *, collector_cluster: str, sample_percent: float
                 ) -> dict[str, Any]:
    """A span per call, exported over OTLP/gRPC to ``collector_cluster``. Envoy continues
    the caller's W3C ``traceparent`` (or starts a trace, sampled at ``sample_percent``)
    and sends its own span's context upstream, so the services' spans are its children.
    No request or response body is ever recorded."""
    return {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": typed(
                "envoy.config.trace.v3.OpenTelemetryConfig",
                grpc_service={"envoy_grpc": {"cluster_name": collector_cluster},
                              "timeout": "1s"},
                service_name=service_name),
        },
        "random_sampling": {"value": sample_percent},
    }


def route_config(name: str, routes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One virtual host matching any authority, with ``routes`` in order."""
    return {"name": name,
            "virtual_hosts": [{"name": name, "domains": ["*"], "routes": list(routes)}]}


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


def local_rate_limited() -> dict[str, Any]:
    """A call refused by its tenant's local bucket: the message names the limit and when
    the bucket has room again (``gateway/ratelimits.py``), as a gRPC client reads it in
    grpc-message. Envoy's own body is ``local_rate_limited``. (A global refusal needs no
    mapper: its body is the rate-limit service's message.)"""
    return {
        "filter": _cel(f"response.code_details == '{LOCAL_RATE_LIMITED}'"),
        "body_format_override": {"text_format": LOCAL_REFUSAL_MESSAGE},
    }


def rate_limit_service_down() -> dict[str, Any]:
    """A call refused because the rate-limit service did not answer (failure mode closed):
    HTTP 503, which a gRPC client reads as UNAVAILABLE (Envoy's own 500 reads UNKNOWN)."""
    return {
        "filter": {"response_flag_filter": {"flags": ["RLSE"]}},
        "status_code": 503,
        "body": {"inline_string": "the rate-limit service is unavailable and the gateway "
                                  "fails closed; retry shortly"},
    }


def http_api_errors(prefix: str, max_request_bytes: int | None) -> list[dict[str, Any]]:
    """Envoy's own replies to requests under ``prefix`` as OpenAI error objects, so an
    OpenAI SDK reads a limit or an outage as it would from OpenAI (its 429 and 503 are
    retried, after ``retry-after`` seconds when given). Replies of the HTTP API itself
    are not local replies and pass untouched.

    - 429 from the tenant's local bucket or from the global limit: the message names the
      limit and when it has room again; ``retry-after`` and ``x-ratelimit-*`` come from
      the refusing filter (``gateway/ratelimits.py``): the bucket's are fixed, the global
      limit's are the rate-limit service's, as is its message (the refusal's body);
    - 413 over ``max_request_bytes``;
    - 503 when the rate-limit service is down and the gateway fails closed (Envoy's 500),
      or when the HTTP API cannot be reached (no healthy host, refused, reset): Envoy's
      own reason is quoted.
    """
    rate_limited = "requests", "rate_limit_exceeded"
    unavailable = "server_error", "service_unavailable"
    mappers = [
        openai_error(_cel(f"response.code_details == '{LOCAL_RATE_LIMITED}'"), *rate_limited,
                     LOCAL_REFUSAL_MESSAGE),
        openai_error(_status_is(429, "genmesh.http_api.rate_limited_code"), *rate_limited,
                     "%LOCAL_REPLY_BODY%"),
    ]
    if max_request_bytes is not None:
        mappers.append(openai_error(
            _status_is(413, "genmesh.http_api.payload_too_large_code"),
            "invalid_request_error", "request_too_large",
            f"request body larger than {max_request_bytes} bytes, the gateway's limit "
            "(max_request_bytes)"))
    mappers += [
        openai_error(
            {"response_flag_filter": {"flags": ["RLSE"]}}, *unavailable,
            "the rate-limit service is unavailable and the gateway fails closed; retry "
            "shortly", retry_after_s=1, status_code=503),
        openai_error(
            {"response_flag_filter": {"flags": list(UPSTREAM_UNAVAILABLE_FLAGS)}}, *unavailable,
            "the HTTP API service is unavailable (%LOCAL_REPLY_BODY%); retry shortly",
            retry_after_s=1, status_code=503),
    ]
    for mapper in mappers:
        mapper["filter"] = {"and_filter": {"filters": [mapper["filter"], _path_starts(prefix)]}}
    return mappers


def openai_error(reply_filter: dict[str, Any], error_type: str, code: str, message: str, *,
                 retry_after_s: int | None = None, status_code: int | None = None
                 ) -> dict[str, Any]:
    """A local reply mapper: replies matching ``reply_filter`` get OpenAI's error object
    as a JSON body (``message`` may hold Envoy's command operators), ``retry-after`` when
    given, and ``status_code`` instead of Envoy's own when given."""
    mapper: dict[str, Any] = {"filter": reply_filter}
    if status_code is not None:
        mapper["status_code"] = status_code
    if retry_after_s is not None:
        mapper["headers_to_add"] = [{
            "header": {"key": "retry-after", "value": str(retry_after_s)},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }]
    mapper["body_format_override"] = {
        "json_format": {"error": {"message": message, "type": error_type, "param": None,
                                  "code": code}},
        "content_type": "application/json",
    }
    return mapper


def _status_is(status: int, runtime_key: str) -> dict[str, Any]:
    return {"status_code_filter": {"comparison": {
        "op": "EQ", "value": {"default_value": status, "runtime_key": runtime_key}}}}


def _path_starts(prefix: str) -> dict[str, Any]:
    return {"header_filter": {"header": {"name": ":path", "string_match": {"prefix": prefix}}}}


def _cel(expression: str) -> dict[str, Any]:
    """A filter on a CEL expression over the request's attributes (``response.*`` too)."""
    return {"extension_filter": {
        "name": "envoy.access_loggers.extension_filters.cel",
        "typed_config": typed("envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                              expression=expression)}}


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
