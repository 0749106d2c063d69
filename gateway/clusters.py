"""Upstream clusters: one per service, actively health checked. The gRPC services speak
HTTP/2; the HTTP API (``http_cluster``) speaks HTTP/1.1 and is probed with ``GET /healthz``.

Health checking, as Envoy does it and as genmesh relies on it:
- Every endpoint is probed with the standard ``grpc.health.v1.Health/Check`` (service "",
  the server as a whole; an HTTP service: ``GET /healthz``) once a second, with or
  without traffic (``no_traffic_interval`` would otherwise slow probing of an idle
  cluster to once a minute). A probe costs its Python server ~1.2 ms of CPU when it wakes
  it from idle (~0.4 back to back): twice a second, the probes of the services were
  ~0.07 ms of CPU per generated token at 32 streams on two cores (`genmesh bench mesh`).
- A host starts unhealthy and receives no traffic until its first probe answers SERVING.
  At boot Envoy finishes that first round before ``/ready`` answers 200, so a backend that
  is down at boot stays out of rotation until a later probe (at most ~1 s after it serves).
- An answer of NOT_SERVING (HTTP: any status but 200, e.g. the 503 of a draining HTTP
  API) takes a host out at that probe (a definite answer, Envoy skips the threshold);
  two network failures in a row (no answer within 1 s, refused connection) do too.
  One SERVING answer puts it back; a host the probes took out is
  probed every 0.25 s, so a replica that `genmesh up` (or a container runtime) restarted
  takes calls again within 0.25 s of serving. (One that outlier detection ejected, below,
  comes back at its next good probe, within the 1 s interval: a restarted process is
  often back before the probes noticed it gone, and this is then its wait.)
- Panic mode is off (threshold 0 %): Envoy's default of spraying traffic over *all* hosts
  once fewer than half are healthy would send requests to a worker that is still loading
  or already gone. With no healthy host a call fails at once with UNAVAILABLE
  ("no healthy upstream").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from gateway.core import duration, socket_address, typed
from gateway.flow_control import MESH_BUFFER_BYTES, UPSTREAM_MAX_STREAMS, http2_options

# (host, port) of one backend process. The host is an IP address or a DNS name.
Endpoint = tuple[str, int]

CONNECT_TIMEOUT_S = 1.0
HEALTH_CHECK_INTERVAL_S = 1.0
HEALTH_CHECK_TIMEOUT_S = 1.0
UNHEALTHY_INTERVAL_S = 0.25  # how often a host out of rotation is probed
UNHEALTHY_THRESHOLD = 2  # consecutive failed probes before a host leaves rotation
HEALTHY_THRESHOLD = 1  # consecutive good probes before it comes back

# Hundreds of concurrent generation streams multiplex over a few HTTP/2 connections;
# Envoy's defaults (1024 requests, 1024 pending) would reject the tail of a load test
# with UNAVAILABLE before any backend is actually saturated.
MAX_CONNECTIONS = 1024
MAX_PENDING_REQUESTS = 4096
MAX_REQUESTS = 4096

HEALTH_CHECK_PATH = "/healthz"  # what an HTTP service answers 200 on while it serves
# An idle HTTP/1.1 connection to an HTTP service is closed by Envoy after this long, before
# the service closes it itself (uvicorn's keep-alive in services/httpapi: 75 s): a request
# written onto a connection the server is closing would fail with 503 (reset, no retry).
HTTP_IDLE_TIMEOUT_S = 60.0


def cluster(name: str, endpoints: Sequence[Endpoint], *, lb_policy: str = "ROUND_ROBIN",
            is_health_checked: bool = True,
            transport_socket: dict[str, Any] | None = None) -> dict[str, Any]:
    """A gRPC cluster over ``endpoints``, load balanced by ``lb_policy`` (worker pools use
    RING_HASH: a route's hash policy then keeps a prompt prefix on one replica).

    STATIC when every host is an IP address (loopback, the local mesh); STRICT_DNS as soon
    as one is a name (docker-compose service names, Kubernetes headless services), which
    Envoy re-resolves and whose every address becomes an endpoint.
    ``is_health_checked=False`` for what is not a genmesh service (a trace collector need
    not serve the gRPC health service). ``transport_socket``: mutual TLS
    (``gateway/tls.py``); None: plaintext.
    """
    config = _upstream(name, endpoints, lb_policy=lb_policy,
                       protocol_options=http2_protocol_options())
    if transport_socket is not None:
        config["transport_socket"] = transport_socket
    if is_health_checked:
        config |= _health_checked(grpc_health_check())
    return config


def http_cluster(name: str, endpoints: Sequence[Endpoint],
                 transport_socket: dict[str, Any] | None = None) -> dict[str, Any]:
    """An HTTP/1.1 cluster over ``endpoints`` (the HTTP API), round robin, probed with
    ``GET /healthz`` (200: in rotation), otherwise health checked like the gRPC clusters.

    HTTP/1.1 carries one request per connection at a time, so MAX_CONNECTIONS also bounds
    the requests in flight to the cluster; the next MAX_PENDING_REQUESTS wait for one."""
    config = _upstream(name, endpoints, lb_policy="ROUND_ROBIN",
                       protocol_options=http1_protocol_options())
    if transport_socket is not None:
        config["transport_socket"] = transport_socket
    return config | _health_checked(http_health_check(HEALTH_CHECK_PATH))


def _upstream(name: str, endpoints: Sequence[Endpoint], *, lb_policy: str,
              protocol_options: dict[str, Any]) -> dict[str, Any]:
    """What every cluster has: endpoints, discovery, balancing, protocol, circuit breakers."""
    if not endpoints:
        raise ValueError(f"cluster {name!r} needs at least one endpoint")
    is_static = all(_is_ip(host) for host, _ in endpoints)
    config: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if is_static else "STRICT_DNS",
        "connect_timeout": duration(CONNECT_TIMEOUT_S),
    }
    if not is_static:
        # Container networks are IPv4; AUTO would try AAAA records first.
        config["dns_lookup_family"] = "V4_PREFERRED"
    return config | {
        "lb_policy": lb_policy,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [_lb_endpoint(host, port) for host, port in endpoints]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": protocol_options,
        },
        "circuit_breakers": circuit_breakers(),
        "per_connection_buffer_limit_bytes": MESH_BUFFER_BYTES,
    }


def _health_checked(health_check: dict[str, Any]) -> dict[str, Any]:
    """Active probing, no panic mode, passive ejection (see the module docstring)."""
    return {
        "health_checks": [health_check],
        "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}},
        "outlier_detection": outlier_detection(),
    }


def outlier_detection() -> dict[str, Any]:
    """Passive ejection of a replica that keeps failing calls (between health probes):
    five connection failures/resets/timeouts in a row eject it for 10 s, longer if it
    repeats; at most half of a pool is ejected at once. Caller errors (a gRPC status
    inside a 200 response) never count. A replica that died and was restarted comes back
    at its first SERVING health probe, not when its ejection time ends."""
    return {
        "consecutive_gateway_failure": 5,
        "enforcing_consecutive_gateway_failure": 100,
        "consecutive_5xx": 5,
        "interval": duration(5.0),
        "base_ejection_time": duration(10.0),
        "max_ejection_percent": 50,
        "successful_active_health_check_uneject_host": True,
    }


def http2_protocol_options() -> dict[str, Any]:
    """Speak HTTP/2 to the upstream: gRPC needs it, and Envoy's default there is HTTP/1.1.
    Windows, stream limit and stream-only resets: ``gateway/flow_control.py``."""
    return typed(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        explicit_http_config={"http2_protocol_options": http2_options(UPSTREAM_MAX_STREAMS)},
    )


def http1_protocol_options() -> dict[str, Any]:
    """Speak HTTP/1.1 to the upstream, closing idle connections before the server does."""
    return typed(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        common_http_protocol_options={"idle_timeout": duration(HTTP_IDLE_TIMEOUT_S)},
        explicit_http_config={"http_protocol_options": {}},
    )


def circuit_breakers() -> dict[str, Any]:
    return {
        "thresholds": [{
            "priority": "DEFAULT",
            "max_connections": MAX_CONNECTIONS,
            "max_pending_requests": MAX_PENDING_REQUESTS,
            "max_requests": MAX_REQUESTS,
        }],
    }


def grpc_health_check() -> dict[str, Any]:
    """Active ``grpc.health.v1.Health/Check`` of every endpoint (see the module docstring)."""
    return _health_check_timing() | {"grpc_health_check": {}}


def http_health_check(path: str) -> dict[str, Any]:
    """Active ``GET path`` of every endpoint: 200 is healthy, any other status takes the
    host out at once (Envoy treats it as definite, like NOT_SERVING)."""
    return _health_check_timing() | {"http_health_check": {
        "path": path, "expected_statuses": [{"start": 200, "end": 201}]}}


def _health_check_timing() -> dict[str, Any]:
    return {
        "timeout": duration(HEALTH_CHECK_TIMEOUT_S),
        "interval": duration(HEALTH_CHECK_INTERVAL_S),
        "no_traffic_interval": duration(HEALTH_CHECK_INTERVAL_S),
        "unhealthy_interval": duration(UNHEALTHY_INTERVAL_S),
        "unhealthy_threshold": UNHEALTHY_THRESHOLD,
        "healthy_threshold": HEALTHY_THRESHOLD,
    }


def _lb_endpoint(host: str, port: int) -> dict[str, Any]:
    return {"endpoint": {"address": socket_address(host, port)}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
