"""`genmesh cache stats` and `genmesh cache invalidate`: the response cache of a running
mesh, reached through Envoy's mesh listener (internal: not the public edge). With the
mesh's mutual TLS the command speaks as the operator identity (its certificate in
``--secrets-dir``, by default that of `genmesh up`'s run directory), which the listener's
RBAC allows these two rpcs and nothing else (gateway/rbac.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from genmesh.launcher.plan import MeshConfig
from genmesh.security import clients, pki
from genmesh.v1 import cache_pb2, cache_pb2_grpc

MESH_ADDRESS = "127.0.0.1:8081"  # the Envoy mesh listener of `genmesh up`
SECRETS_DIR = MeshConfig().secrets_dir  # `genmesh up`'s, when it made one


def _channel(args: argparse.Namespace) -> grpc.Channel:
    return clients.channel_if_secrets(args.address, pki.Secrets(args.secrets_dir),
                                      identity=pki.OPERATOR, peer=pki.GATEWAY)


def register(sub: argparse._SubParsersAction) -> None:
    cache = sub.add_parser("cache", help="the response cache of a running mesh")
    actions = cache.add_subparsers(dest="action", required=True)
    stats = actions.add_parser("stats", help="counters and size, as JSON")
    stats.add_argument("--address", default=MESH_ADDRESS, help="Envoy's mesh listener")
    stats.add_argument("--secrets-dir", type=Path, default=SECRETS_DIR,
                       help="the mesh's secrets (the operator's certificate)")
    stats.set_defaults(func=_stats)
    drop = actions.add_parser("invalidate", help="drop a tenant's and/or a version's answers")
    drop.add_argument("--address", default=MESH_ADDRESS, help="Envoy's mesh listener")
    drop.add_argument("--secrets-dir", type=Path, default=SECRETS_DIR,
                      help="the mesh's secrets (the operator's certificate)")
    drop.add_argument("--tenant", default="", help="only this tenant's answers")
    drop.add_argument("--model-version", default="", help="only this version's answers")
    drop.set_defaults(func=_invalidate)


def _stats(args: argparse.Namespace) -> int:
    with _channel(args) as channel:
        try:
            reply = cache_pb2_grpc.CacheStub(channel).GetStats(cache_pb2.CacheStatsRequest(),
                                                               timeout=10)
        except grpc.RpcError as exc:
            print(f"genmesh: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(json.dumps(MessageToDict(reply, always_print_fields_with_no_presence=True), indent=2))
    return 0


def _invalidate(args: argparse.Namespace) -> int:
    if not args.tenant and not args.model_version:
        raise ValueError("give --tenant, --model-version or both")
    with _channel(args) as channel:
        try:
            reply = cache_pb2_grpc.CacheStub(channel).Invalidate(cache_pb2.InvalidateRequest(
                tenant=args.tenant, model_version=args.model_version), timeout=30)
        except grpc.RpcError as exc:
            print(f"genmesh: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"removed {reply.num_removed} cached answers")
    return 0
