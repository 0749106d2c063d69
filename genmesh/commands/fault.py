"""`genmesh fault kill` and `genmesh fault soak`: issue 19's fault injection and soak
against a mesh started here as `genmesh up` starts it (first version, free ports)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from genmesh.core.deployment import load as load_deployment
from genmesh.core.models.store import ModelStore, default_store_root
from genmesh.launcher.plan import DEFAULT_DEPLOYMENT


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fault", help="fault injection under load, and a soak (start their "
                                     "own mesh; print a table)")
    fsub = p.add_subparsers(dest="fault_command", required=True)
    k = fsub.add_parser("kill", help="SIGKILL each process type under load: what in-flight "
                                     "and other calls get, and when the mesh serves again")
    k.add_argument("--processes", help="comma-separated, in order (default: worker-v1, "
                                       "tokenizer, safety, cache, redis, ratelimit, frontend)")
    k.add_argument("--streams", type=int, default=4, help="concurrent streaming clients")
    k.add_argument("--run-dir", type=Path, help="logs (default: a temporary directory)")
    k.add_argument("--output", help="also write the rows as JSON to this file")
    k.set_defaults(func=_kill)
    s = fsub.add_parser("soak", help="concurrent streams with random cancels: errors, the KV "
                                     "pool, every process's resident memory")
    s.add_argument("--streams", type=int, default=64)
    s.add_argument("--duration-s", type=float, default=120.0, help="after the warm-up")
    s.add_argument("--warmup-s", type=float, default=60.0,
                   help="at least; then until every process's resident memory settles")
    s.add_argument("--max-warmup-s", type=float, default=300.0)
    s.add_argument("--cancel-fraction", type=float, default=0.3,
                   help="streams the client cancels at a random point")
    s.add_argument("--run-dir", type=Path, help="logs (default: a temporary directory)")
    s.add_argument("--output", help="also write the result as JSON to this file")
    s.set_defaults(func=_soak)


def _ensure_model() -> None:
    ModelStore(default_store_root()).ensure(load_deployment(DEFAULT_DEPLOYMENT).model)


def _kill(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from genmesh.bench.fault import FaultConfig, parse_processes, run_fault_suite
    from genmesh.bench.fault_report import HEADER, FaultRow, format_table, table_rows

    _ensure_model()
    config = FaultConfig(processes=tuple(parse_processes(args.processes)),
                         num_streams=args.streams)

    def on_row(row: FaultRow) -> None:
        cells = dict(zip(HEADER, table_rows([row])[0], strict=True))
        print("genmesh: " + "; ".join(f"{k}: {v}" for k, v in cells.items()),
              file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="genmesh-fault-") as tmp:
        rows = run_fault_suite(config, run_dir=args.run_dir or Path(tmp), on_row=on_row)
    print(format_table(rows))
    if args.output:
        Path(args.output).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0 if all(r.is_passed for r in rows) else 1


def _soak(args: argparse.Namespace) -> int:
    from genmesh.bench.soak import SoakConfig, format_soak, run_soak

    _ensure_model()
    config = SoakConfig(num_streams=args.streams, duration_s=args.duration_s,
                        warmup_s=args.warmup_s, max_warmup_s=args.max_warmup_s,
                        cancel_fraction=args.cancel_fraction)
    with tempfile.TemporaryDirectory(prefix="genmesh-soak-") as tmp:
        result = run_soak(config, run_dir=args.run_dir or Path(tmp))
    print(format_soak(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return 0 if result.is_passed else 1
