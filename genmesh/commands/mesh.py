"""`genmesh up` and `genmesh status`: run the whole mesh locally and check on it.

`genmesh up` supervises what it starts: a process that exits is restarted (with backoff,
within a restart budget; ``genmesh/launcher/restarts.py``) while the rest keep serving,
and SIGINT or SIGTERM stop the mesh gracefully (``Supervisor.stop``); a second signal
stops it without waiting.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from genmesh.client.types import DEV_API_KEY
from genmesh.core.deployment import DeploymentError
from genmesh.core.deployment import load as load_deployment
from genmesh.core.models.store import ModelNotFoundError, ModelStore, default_store_root
from genmesh.launcher.plan import PORT_FIELDS, MeshConfig, MissingPieceError, plan
from genmesh.launcher.restarts import Exit, ProcessState
from genmesh.launcher.state import STATE_FILE, ProcessStatus, read_state
from genmesh.launcher.supervisor import ProcessFailedError, Supervisor

DEFAULT_RUN_DIR = MeshConfig().run_dir


def register(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="start the whole mesh locally and keep it up (Ctrl-C "
                                   "or SIGTERM stops it gracefully)")
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
    up.add_argument("--mtls", action=argparse.BooleanOptionalAction, default=None,
                    help="mutual TLS inside the mesh, RBAC on its listener, Redis users "
                         "(default: the deployment's security.mtls)")
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
    up.add_argument("--stop-grace", type=float, default=defaults.stream_grace_s,
                    metavar="SECONDS",
                    help="when the mesh stops (SIGINT, SIGTERM), how long in-flight streams "
                         "may take to finish before they are cut (default: %(default)s)")
    up.add_argument("--demo", metavar="MESSAGE", action="append", default=[],
                    help="once serving, stream a chat of these turns through the edge, then "
                         "stop (repeatable: one turn each)")
    up.set_defaults(func=_up)
    status = sub.add_parser("status", help="every process of `genmesh up`: state, restarts, "
                                           "last exit, health")
    status.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    status.set_defaults(func=_status)


def _up(args: argparse.Namespace) -> int:
    versions = tuple(v.strip() for v in args.versions.split(",")) if args.versions else None
    cfg = MeshConfig(
        **{name: getattr(args, name) for name in PORT_FIELDS}, deployment=args.deployment,
        model=args.model, versions=versions, dtype=args.dtype, kv_cache_gib=args.kv_cache_gib,
        with_redis=not args.no_redis, run_dir=args.run_dir, safety_policy=args.safety_policy,
        safety_embedding=not args.no_safety_embedding, otlp_endpoint=args.otlp_endpoint,
        with_prometheus=False if args.no_prometheus else None, stream_grace_s=args.stop_grace,
        mtls=args.mtls)
    try:
        ModelStore(default_store_root()).path_of(cfg.model or load_deployment(cfg.deployment).model)
        specs = plan(cfg)
    except (ModelNotFoundError, MissingPieceError, DeploymentError) as exc:
        print(f"genmesh: {exc}", file=sys.stderr)
        return 2
    sink = None if args.quiet else _print_log_line
    supervisor = Supervisor(specs, run_dir=cfg.run_dir, sink=sink, on_event=_print_event)
    stop_requested = threading.Event()
    _stop_on_signals(supervisor, stop_requested)
    print(f"starting the mesh (logs in {cfg.run_dir}) ...", file=sys.stderr)
    try:
        supervisor.start()
        if not supervisor.wait_ready(args.timeout, until=stop_requested):
            return 0
        print_table(supervisor.statuses())
        if args.demo:
            return _demo(cfg.edge_address, args.demo, stop_requested)
        print(f"\nthe public API: {cfg.edge_address} — try `genmesh chat --address "
              f"{cfg.edge_address}`; Ctrl-C stops the mesh", file=sys.stderr)
        supervisor.supervise(until=stop_requested)
        return 0
    except (ProcessFailedError, TimeoutError) as exc:
        print(f"genmesh: {exc}", file=sys.stderr)
        return 1
    finally:
        print("\nstopping the mesh ...", file=sys.stderr)
        supervisor.stop()
        print("stopped", file=sys.stderr)


def _stop_on_signals(supervisor: Supervisor, stop_requested: threading.Event) -> None:
    """SIGINT and SIGTERM both set ``stop_requested`` (a graceful stop follows); a second
    one makes the stop skip its graces. SIGINT gets a handler of its own too: a shell
    starts a background job (`genmesh up &`) with SIGINT ignored."""
    def on_signal(signum: int, frame: object) -> None:
        if stop_requested.is_set():
            supervisor.hurry()
        stop_requested.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)


def _demo(address: str, turns: list[str], stop_requested: threading.Event) -> int:
    """The chat runs in a thread of its own, so that a signal still stops the mesh."""
    results: list[int] = []
    chat = threading.Thread(target=lambda: results.append(_run_demo(address, turns)),
                            name="demo", daemon=True)
    chat.start()
    while chat.is_alive() and not stop_requested.wait(0.2):
        pass
    return results[0] if results else 1


def _run_demo(address: str, turns: list[str]) -> int:
    from genmesh.client import Client
    from genmesh.commands.client import run_turns

    with (Client(address, timeout_s=120, api_key=DEV_API_KEY) as client,
          client.chat(max_tokens=128) as session):
        return run_turns(session, turns, echo=True, stop_on_error=True)


def _print_log_line(name: str, line: str) -> None:
    print(f"{name:>9} | {line}", file=sys.stderr, flush=True)


def _print_event(line: str) -> None:
    print(f"genmesh: {line}", file=sys.stderr, flush=True)


def print_table(statuses: list[ProcessStatus], now: float | None = None) -> None:
    """One row per process: its state under supervision, restarts, last exit (``now``:
    Unix time, for how long ago), and whether its probe says it serves right now."""
    now = time.time() if now is None else now
    print(f"{'process':<10} {'pid':>8}  {'endpoint':<22} {'state':<9} {'restarts':>8}  "
          f"{'last exit':<36} health")
    for s in statuses:
        r = s.record
        last_exit = "-" if r.last_exit is None else describe_exit(r.last_exit, now)
        health = "SERVING" if s.is_serving else "NOT SERVING"
        print(f"{r.name:<10} {r.pid or '-':>8}  {r.endpoint:<22} {r.state or '-':<9} "
              f"{r.num_restarts:>8}  {last_exit:<36} {health}")


def describe_exit(exit: Exit, now: float) -> str:
    """``killed by SIGKILL at 14:03:07 (12 s ago)``."""
    clock = time.strftime("%H:%M:%S", time.localtime(exit.at))
    return f"{exit.describe()} at {clock} ({max(0, now - exit.at):.0f} s ago)"


def no_mesh_message(run_dir: Path) -> str:
    return f"genmesh: no mesh is running from {run_dir} (start one with `genmesh up`)"


def _status(args: argparse.Namespace) -> int:
    """Exit status 0 when every process serves and none has FAILED."""
    state_file = args.run_dir / STATE_FILE
    try:
        state = read_state(state_file)
    except FileNotFoundError:
        print(no_mesh_message(args.run_dir), file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"genmesh: cannot read {state_file}: {exc}", file=sys.stderr)
        return 1
    statuses = [ProcessStatus(r, r.probe()) for r in state.processes]
    print_table(statuses)
    if state.supervisor_pid is not None and not _is_alive(state.supervisor_pid):
        print(f"genmesh: the `genmesh up` that wrote {state_file} (pid "
              f"{state.supervisor_pid}) is gone: nothing restarts these processes",
              file=sys.stderr)
        return 1
    is_failed = any(s.record.state == ProcessState.FAILED for s in statuses)
    return 0 if all(s.is_serving for s in statuses) and not is_failed else 1


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True
