"""`genmesh rollout`: change which model version serves a running mesh, live.

    genmesh rollout status            the rollout state and requests per version
    genmesh rollout canary 10         10 % of worker traffic to the candidate
    genmesh rollout shadow 25         mirror 25 % of Generate calls to the candidate
    genmesh rollout promote           the candidate becomes the primary
    genmesh rollout rollback          undo the canary/shadow, or the last promote
    genmesh rollout report            shadow vs primary: agreement and latency

Every change is checked and validated by Envoy before it replaces the mesh's xDS files,
and the command returns once the running Envoy has taken it (a warning if it has not
said so within 5 s); a refused change prints why and leaves traffic as it was (exit
status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import redis

from gateway import rollout, xds
from gateway.metrics import admin_stats, admin_url
from genmesh.commands.mesh import DEFAULT_RUN_DIR, no_mesh_message
from genmesh.core import deployment as deploy
from genmesh.core.deployment import Deployment, DeploymentError, Rollout
from genmesh.core.records import STREAM, GenerationRecord
from genmesh.launcher.plan import DEPLOYMENT_FILE, XDS_DIR
from genmesh.rollout_report import compare
from genmesh.security import pki

ADMIN_TIMEOUT_S = 2.0
LIVE_TIMEOUT_S = 5.0  # how long a change waits for Envoy to take it
REDIS_TIMEOUT_S = 5.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rollout", help="canary, shadow, promote or roll back model versions live")
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                   help="the run directory of `genmesh up`")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("status", help="the rollout state and requests per version")
    canary = actions.add_parser("canary", help="send PERCENT of worker traffic to the candidate")
    canary.add_argument("percent", type=float)
    canary.add_argument("--split", choices=[m.value for m in deploy.SplitMode],
                        help="random: per request; tenant: by a stable hash of the tenant")
    shadow = actions.add_parser("shadow", help="mirror PERCENT of Generate calls to the candidate")
    shadow.add_argument("percent", type=float)
    actions.add_parser("promote", help="the candidate becomes the primary")
    actions.add_parser("rollback", help="undo the canary and shadow, or the last promote")
    report = actions.add_parser("report", help="shadow vs primary, as JSON")
    report.add_argument("--last", type=int, default=5000, help="records to read (newest)")
    p.set_defaults(func=_rollout)


def _rollout(args: argparse.Namespace) -> int:
    path = args.run_dir / DEPLOYMENT_FILE
    if not path.exists():
        print(no_mesh_message(args.run_dir), file=sys.stderr)
        return 1
    dep = deploy.load(path)
    if args.action == "status":
        return _status(dep)
    if args.action == "report":
        return _report(dep, args.last)
    changes: dict[str, Callable[[Rollout], Rollout]] = {
        "canary": lambda r: _with_split(rollout.canary(r, args.percent), args.split),
        "shadow": lambda r: rollout.shadow(r, args.percent),
        "promote": rollout.promote,
        "rollback": rollout.rollback,
    }
    try:
        changed = apply_change(dep, changes[args.action](dep.rollout), args.run_dir)
    except DeploymentError as exc:
        print(f"genmesh: {exc}; the mesh keeps its current rollout "
              f"({rollout.describe(dep.rollout)})", file=sys.stderr)
        return 2
    print(rollout.describe(changed.rollout))
    return 0


def apply_change(dep: Deployment, new: Rollout, run_dir: Path) -> Deployment:
    """Make ``new`` the live rollout of the mesh in ``run_dir``, and return once Envoy has
    taken it (or said nothing for LIVE_TIMEOUT_S: then a warning); DeploymentError if
    refused."""
    changed = dep.with_rollout(new)
    live = xds.apply_live(changed, run_dir / XDS_DIR, timeout_s=LIVE_TIMEOUT_S)
    deploy.save(changed, run_dir / DEPLOYMENT_FILE)
    if not live:
        print(f"genmesh: the change is written, but Envoy (admin port "
              f"{dep.gateway.admin_port}) has not confirmed taking it within "
              f"{LIVE_TIMEOUT_S:.0f} s; `genmesh status` shows whether it runs",
              file=sys.stderr)
    return changed


def _with_split(r: Rollout, split: str | None) -> Rollout:
    return r if split is None else dataclasses.replace(r, split=deploy.SplitMode(split))


def requests_per_version(dep: Deployment) -> dict[str, int]:
    """Calls Envoy has sent to each version's pool since it started (admin stats)."""
    stats = admin_stats(admin_url(dep.gateway), "upstream_rq_total$",
                        timeout_s=ADMIN_TIMEOUT_S)
    return {v.name: stats.get(f"cluster.{v.cluster}.upstream_rq_total", 0)
            for v in dep.versions}


def _status(dep: Deployment) -> int:
    print(rollout.describe(dep.rollout))
    try:
        counts = requests_per_version(dep)
    except OSError as exc:
        print(f"genmesh: cannot read Envoy's stats ({exc})", file=sys.stderr)
        return 1
    for name, count in counts.items():
        print(f"  {name}: {count} calls since the gateway started")
    return 0


def operator_redis_url(dep: Deployment) -> str:
    """The deployment's Redis, logged in as the operator when the mesh has its users."""
    assert dep.redis_url is not None
    if not dep.security.mtls:
        return dep.redis_url
    return pki.login(dep.redis_url, pki.Secrets(Path(dep.security.secrets_dir)), pki.OPERATOR)


def read_records(url: str, last: int) -> list[GenerationRecord]:
    client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S,
                                  socket_connect_timeout=REDIS_TIMEOUT_S, decode_responses=True)
    try:
        entries = client.xrevrange(STREAM, count=last)
    finally:
        client.close()
    return [GenerationRecord.from_fields(fields) for _, fields in entries]  # type: ignore[union-attr,arg-type]


def _report(dep: Deployment, last: int) -> int:
    if dep.redis_url is None:
        print("genmesh: this mesh runs without Redis, so nothing is recorded", file=sys.stderr)
        return 1
    try:
        records = read_records(operator_redis_url(dep), last)
    except redis.RedisError as exc:
        print(f"genmesh: cannot read the records from Redis ({exc})", file=sys.stderr)
        return 1
    print(json.dumps({"rollout": rollout.describe(dep.rollout), **compare(records)}, indent=2))
    return 0
