"""`genmesh up` and `genmesh status`: run the whole mesh locally and check on it."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from gateway.deployment import DeploymentError
from gateway.deployment import load as load_deployment
from genmesh.client.types import DEV_API_KEY
from genmesh.launcher.plan import PORT_FIELDS, MeshConfig, MissingPieceError, plan
from genmesh.launcher.probes import EnvoyReady, GrpcHealth, HttpReady, Probe, RedisPing
from genmesh.launcher.supervisor import STATE_FILE, ProcessFailedError, ProcessStatus, Supervisor
from genmesh.models.store import ModelNotFoundError, ModelStore, default_store_root

DEFAULT_RUN_DIR = MeshConfig().run_dir


def register(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="start the whole mesh locally (Ctrl-C stops it)")
    defaults = MeshConfig()
    for name in PORT_FIELDS:
        up.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    up.add_argument("--deployment", type=Path, default=defaults.deployment,
                    help="the deployment description: model versions, tenants, limits, "
                         "rollout (default: %(default)s)")
    up.add_argument("--model", help="serve this model of the store instead of the deployment's")
    up.add_argument("--versions", help="comma-separated versions to run (default: all)")
    up.add_argument("--dtype", help="run every version in this dtype (default: each its own)")
    up.add_argument("--kv-cache-gib", type=float, default=defaults.kv_cache_gib)
    up.add_argument("--no-redis", action="store_true", help="do not start Redis")
    up.add_argument("--safety-policy", type=Path,
                    help="the safety service's per-tenant policy (default: "
                         "deploy/safety/policy.yaml)")
    up.add_argument("--no-safety-embedding", action="store_true",
                    help="prompt-injection rules only: do not load the embedding model")
    up.add_argument("--otlp-endpoint", default=None, metavar="HOST:PORT",
                    help="export every process's spans to this OTLP/gRPC collector "
                         "(default: the deployment's observability.otlp_endpoint)")
    up.add_argument("--no-prometheus", action="store_true",
                    help="do not start Prometheus (started when `prometheus` is installed)")
    up.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                    help="logs, Envoy's config and the state file `genmesh status` reads")
    up.add_argument("--quiet", action="store_true", help="do not stream the services' logs")
    up.add_argument("--timeout", type=float, default=300, help="seconds to wait for health")
    up.add_argument("--demo", metavar="MESSAGE", action="append", default=[],
                    help="once serving, stream a chat of these turns through the edge, then "
                         "stop (repeatable: one turn each)")
    up.set_defaults(func=_up)
    status = sub.add_parser("status", help="health of every process of `genmesh up`")
    status.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    status.set_defaults(func=_status)


def _up(args: argparse.Namespace) -> int:
    versions = tuple(v.strip() for v in args.versions.split(",")) if args.versions else None
    cfg = MeshConfig(
        **{name: getattr(args, name) for name in PORT_FIELDS}, deployment=args.deployment,
        model=args.model, versions=versions, dtype=args.dtype, kv_cache_gib=args.kv_cache_gib,
        with_redis=not args.no_redis, run_dir=args.run_dir, safety_policy=args.safety_policy,
        safety_embedding=not args.no_safety_embedding, otlp_endpoint=args.otlp_endpoint,
        with_prometheus=False if args.no_prometheus else None)
    try:
        ModelStore(default_store_root()).path_of(cfg.model or load_deployment(cfg.deployment).model)
        specs = plan(cfg)
    except (ModelNotFoundError, MissingPieceError, DeploymentError) as exc:
        print(f"genmesh: {exc}", file=sys.stderr)
        return 2
    sink = None if args.quiet else _print_log_line
    supervisor = Supervisor(specs, run_dir=cfg.run_dir, sink=sink)
    # Ctrl-C and SIGTERM both end the wait below; children are then stopped in order.
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"starting the mesh (logs in {cfg.run_dir}) ...", file=sys.stderr)
    try:
        supervisor.start()
        supervisor.wait_ready(args.timeout)
        print_table(supervisor.statuses())
        if args.demo:
            return _demo(cfg.edge_address, args.demo)
        print(f"\nthe public API: {cfg.edge_address} — try `genmesh chat --address "
              f"{cfg.edge_address}`; Ctrl-C stops the mesh", file=sys.stderr)
        while True:
            supervisor.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping the mesh ...", file=sys.stderr)
        return 0
    except (ProcessFailedError, TimeoutError) as exc:
        print(f"genmesh: {exc}", file=sys.stderr)
        return 1
    finally:
        supervisor.stop()
        print("stopped", file=sys.stderr)


def _demo(address: str, turns: list[str]) -> int:
    from genmesh.client import Client
    from genmesh.commands.client import run_turns

    with (Client(address, timeout_s=120, api_key=DEV_API_KEY) as client,
          client.chat(max_tokens=128) as session):
        return run_turns(session, turns, echo=True, stop_on_error=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _print_log_line(name: str, line: str) -> None:
    print(f"{name:>9} | {line}", file=sys.stderr, flush=True)


def print_table(statuses: list[ProcessStatus]) -> None:
    print(f"{'process':<10} {'pid':>8}  {'endpoint':<22} status")
    for s in statuses:
        state = "SERVING" if s.is_serving else "NOT SERVING"
        print(f"{s.name:<10} {s.pid or '-':>8}  {s.endpoint:<22} {state}")


_PROBES: dict[str, type] = {p.__name__: p for p in (GrpcHealth, HttpReady, EnvoyReady,
                                                    RedisPing)}


def no_mesh_message(run_dir: Path) -> str:
    return f"genmesh: no mesh is running from {run_dir} (start one with `genmesh up`)"


def _status(args: argparse.Namespace) -> int:
    state_file = args.run_dir / STATE_FILE
    if not state_file.exists():
        print(no_mesh_message(args.run_dir), file=sys.stderr)
        return 1
    statuses = []
    for p in json.loads(state_file.read_text())["processes"]:
        probe: Probe = _PROBES[p["probe"]](*p["probe_args"])
        statuses.append(ProcessStatus(p["name"], p["pid"], p["endpoint"], probe()))
    print_table(statuses)
    return 0 if all(s.is_serving for s in statuses) else 1
