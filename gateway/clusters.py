"""Upstream clusters: one per gRPC service, HTTP/2 to every endpoint, actively health checked.

Health checking, as Envoy does it and as genmesh relies on it:
- Every endpoint is probed with the standard ``grpc.health.v1.Health/Check`` (service "",
  the server as a whole) once a second, with or without traffic (``no_traffic_interval``
  would otherwise slow probing of an idle cluster to once a minute).
- A host starts unhealthy and receives no traffic until its first probe answers SERVING.
  At boot Envoy finishes that first round before ``/ready`` answers 200, so a backend that
  is down at boot stays out of rotation until a later probe (at most ~1 s after it serves).
- An answer of NOT_SERVING takes a host out at that probe (a definite answer, Envoy
  skips the threshold); two network failures in a row (no answer within 1 s, refused
  connection) do too. One SERVING answer puts it back; a host the probes took out is
  probed every 0.25 s, so a replica that `genmesh up` (or a container runtime) restarted
  takes calls again within 0.25 s of serving. (One that outlier detection ejected, below,
  comes back at its next good probe, within the 1 s interval.)
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


def cluster(name: str, endpoints: Sequence[Endpoint], *, lb_policy: str = "ROUND_ROBIN",
            is_health_checked: bool = True) -> dict[str, Any]:
    """A gRPC cluster over ``endpoints``, load balanced by ``lb_policy`` (worker pools use
    RING_HASH: a route's hash policy then keeps a prompt prefix on one replica).

    STATIC when every host is an IP address (loopback, the local mesh); STRICT_DNS as soon
    as one is a name (docker-compose service names, Kubernetes headless services), which
    Envoy re-resolves and whose every address becomes an endpoint.
    ``is_health_checked=False`` for what is not a genmesh service (a trace collector need
    not serve the gRPC health service).
    """
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
    config |= {
        "lb_policy": lb_policy,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [_lb_endpoint(host, port) for host, port in endpoints]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": http2_protocol_options(),
        },
        "circuit_breakers": circuit_breakers(),
    }
    if is_health_checked:
        config |= {
            "health_checks": [grpc_health_check()],
            "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}},
            "outlier_detection": outlier_detection(),
        }
    return config


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
    """Speak HTTP/2 to the upstream: gRPC needs it, and Envoy's default there is HTTP/1.1."""
    return typed(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        explicit_http_config={"http2_protocol_options": {}},
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
    return {
        "timeout": duration(HEALTH_CHECK_TIMEOUT_S),
        "interval": duration(HEALTH_CHECK_INTERVAL_S),
        "no_traffic_interval": duration(HEALTH_CHECK_INTERVAL_S),
        "unhealthy_interval": duration(UNHEALTHY_INTERVAL_S),
        "unhealthy_threshold": UNHEALTHY_THRESHOLD,
        "healthy_threshold": HEALTHY_THRESHOLD,
        "grpc_health_check": {},
    }


def _lb_endpoint(host: str, port: int) -> dict[str, Any]:
    return {"endpoint": {"address": socket_address(host, port)}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
