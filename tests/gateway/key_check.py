"""The frontend's key check (``services/frontend/auth.py``) on a plain grpc server, for
tests whose Envoy runs in front of stand-ins: with tenants, the edge asks the frontend
cluster's ``Authorization/Check`` before it routes any request."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from genmesh.authz.v3 import external_auth_pb2 as authz
from genmesh.core.deployment import Tenant
from services.frontend.auth import KeyRing, check


def add_key_check(server: grpc.Server, tenants: Sequence[Tenant], *,
                  key_header: str = "x-api-key") -> None:
    """Serve Check for ``tenants`` on ``server`` (not started yet)."""
    keys = KeyRing.of({t.name: t.api_keys for t in tenants})
    handler = grpc.unary_unary_rpc_method_handler(
        lambda request, context: check(keys, request, key_header=key_header),
        request_deserializer=authz.CheckRequest.FromString,
        response_serializer=authz.CheckResponse.SerializeToString)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "envoy.service.auth.v3.Authorization", {"Check": handler})])


def start_key_check(tenants: Sequence[Tenant], *, port: int) -> grpc.Server:
    """A server on ``port`` that serves health (SERVING) and Check alone."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.so_reuseport", 0)])
    server.add_insecure_port(f"127.0.0.1:{port}")
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    add_key_check(server, tenants)
    server.start()
    return server
