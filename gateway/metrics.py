"""Envoy's metrics listener: how Prometheus and readiness probes reach Envoy without its admin.

Envoy's admin interface has no authentication: ``/config_dump`` holds the tenants' API keys
and ``POST /quitquitquit`` stops the gateway. It listens on ``gateway.admin_host``
(loopback). Whoever must reach Envoy from outside its host or pod gets a listener of its
own on ``gateway.host:gateway.metrics_port``, which passes exactly two read-only admin
endpoints through:

- ``GET /stats/prometheus``: Envoy's ``envoy_*`` series, for Prometheus;
- ``GET /ready``: 200 once Envoy is initialized, for a readiness probe.

A path matches exactly and case-sensitively. The query string is set aside when matching
and forwarded (both endpoints only read it). Anything else, another method included, is
answered 404 by the listener itself, and admin never sees it.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
import urllib.request
from typing import Any

from gateway.core import duration, socket_address
from gateway.listeners import http_connection_manager, listener, route_config
from genmesh.core.deployment import GatewaySettings

LISTENER = "metrics"
ADMIN_CLUSTER = "envoy-admin"  # the admin interface, as an upstream of the metrics listener
SERVED_PATHS = ("/stats/prometheus", "/ready")
CONNECT_TIMEOUT_S = 1.0


def metrics_listener(g: GatewaySettings) -> dict[str, Any]:
    """The listener on ``g.host:g.metrics_port`` (with its routes inline: they never change)."""
    manager = http_connection_manager(
        LISTENER, routes={"route_config": route_config(LISTENER, metrics_routes())},
        is_edge=False, max_request_bytes=None, stream_idle_timeout_s=g.stream_idle_timeout_s,
        max_request_headers_kb=g.max_request_headers_kb,
        access_log=False)  # a scrape every few seconds is not a call worth a log line
    return listener(LISTENER, host=g.host, port=g.metrics_port, manager=manager)


def metrics_routes() -> list[dict[str, Any]]:
    """``GET`` of each of SERVED_PATHS to admin, in order, then 404 for everything else."""
    routes: list[dict[str, Any]] = [{
        "match": {"path": path, "headers": [{"name": ":method",
                                             "string_match": {"exact": "GET"}}]},
        "route": {"cluster": ADMIN_CLUSTER},
    } for path in SERVED_PATHS]
    message = (f"genmesh {LISTENER}: only GET {' and GET '.join(SERVED_PATHS)} are served "
               "here; Envoy's admin interface is not reachable from outside its host")
    routes.append({"match": {"prefix": "/"},
                   "direct_response": {"status": 404, "body": {"inline_string": message}}})
    return routes


def admin_cluster(g: GatewaySettings) -> dict[str, Any]:
    """Envoy's own admin interface as a plain HTTP/1.1 upstream (not a gRPC service: no
    HTTP/2, no health check)."""
    return {
        "name": ADMIN_CLUSTER,
        "type": "STATIC",
        "connect_timeout": duration(CONNECT_TIMEOUT_S),
        "load_assignment": {
            "cluster_name": ADMIN_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": socket_address(admin_dial_host(g.admin_host), g.admin_port)}}]}],
        },
    }


def admin_url(g: GatewaySettings) -> str:
    """Where this host dials Envoy's admin interface, e.g. ``http://127.0.0.1:9901``."""
    return f"http://{admin_dial_host(g.admin_host)}:{g.admin_port}"


def admin_stats(url: str, pattern: str, *, timeout_s: float) -> dict[str, int]:
    """Envoy's counters and gauges whose names match the regex ``pattern`` (admin
    ``/stats?filter=``), from the admin at ``url``; OSError if it does not answer."""
    query = urllib.parse.quote(pattern)
    with urllib.request.urlopen(f"{url}/stats?filter={query}", timeout=timeout_s) as reply:
        text = reply.read().decode()
    matches = re.compile(pattern).search  # again here: the filter is Envoy's to honour
    out = {}
    for line in text.splitlines():  # "cluster.worker-v1.upstream_rq_total: 12"
        name, _, value = line.partition(": ")
        if matches(name) and value.strip().isdigit():  # histograms' are not numbers
            out[name] = int(value)
    return out


def admin_dial_host(admin_host: str) -> str:
    """The address to dial admin at: its own, or loopback when it listens on every address."""
    address = ipaddress.ip_address(admin_host)
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return admin_host
