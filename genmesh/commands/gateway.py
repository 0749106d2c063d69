"""`genmesh gateway`: Envoy's configuration from a deployment description, for a gateway
that runs outside `genmesh up` (a docker-compose service, a Kubernetes pod).

    genmesh gateway render --deployment FILE              static bootstrap, validated, to stdout
    genmesh gateway render --deployment FILE --run-dir D  the live layout `genmesh up` writes
    genmesh gateway limits --deployment FILE              the rate-limit service's limits file
    genmesh gateway run --deployment FILE                 render the live layout, then become Envoy

Tenants' API keys are ``${VAR}`` references in the description, read from the environment
here: a rendered configuration holds real keys, so it is rendered where it runs, never
committed. Everything goes through ``gateway/``: our checks, then ``envoy --mode validate``.

The live layout in ``--run-dir`` is the one of `genmesh up` (``deployment.yaml``, ``xds/``,
``envoy.yaml``, ``ratelimit.yaml``), so `genmesh rollout --run-dir D` changes the routes
of a running gateway live.

The gateway image carries no PyTorch, which the rest of the CLI imports:
``python -m genmesh.commands.gateway`` offers these commands and `rollout` without it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml

from gateway import ratelimits, xds
from gateway.envoy import dynamic_bootstrap, envoy_command, render, validate
from genmesh.commands import rollout
from genmesh.commands.mesh import DEFAULT_RUN_DIR
from genmesh.core import deployment as deploy
from genmesh.core.deployment import Deployment, DeploymentError
from genmesh.launcher.plan import DEPLOYMENT_FILE, XDS_DIR

ENVOY_FILE = "envoy.yaml"  # the dynamic bootstrap, in the run directory
LIMITS_FILE = "ratelimit.yaml"  # the rate-limit service's limits, in the run directory


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gateway", help="render Envoy's config from a deployment, or run Envoy")
    _register_actions(p)


def _register_actions(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    actions = parser.add_subparsers(dest="action", required=True)
    render_p = actions.add_parser(
        "render", help="Envoy's static bootstrap (validated by Envoy), or with --run-dir the "
                       "live layout: deployment, xDS files, dynamic bootstrap, limits")
    _deployment_arg(render_p)
    render_p.add_argument("-o", "--output", type=Path,
                          help="write the static bootstrap here instead of stdout")
    render_p.add_argument("--run-dir", type=Path,
                          help="write the live layout here (what `genmesh rollout` edits)")
    render_p.add_argument("--no-validate", action="store_true",
                          help="skip `envoy --mode validate` (static bootstrap only)")
    render_p.set_defaults(func=_render)
    limits_p = actions.add_parser("limits", help="the rate-limit service's limits file (YAML)")
    _deployment_arg(limits_p)
    limits_p.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    limits_p.set_defaults(func=_limits)
    run_p = actions.add_parser("run", help="render the live layout into --run-dir, then "
                                           "replace this process with Envoy serving it")
    _deployment_arg(run_p)
    run_p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                       help="where the live layout goes (default: %(default)s, the default "
                            "of `genmesh rollout`)")
    run_p.add_argument("--log-level", default="warning", help="Envoy's log level")
    run_p.set_defaults(func=_run)
    return actions


def _deployment_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deployment", type=Path, required=True,
                        help="the deployment description (API keys as ${VAR} from the "
                             "environment)")


def _render(args: argparse.Namespace) -> int:
    dep = deploy.load(args.deployment)
    if args.run_dir is not None:
        if args.output is not None:
            raise ValueError("give --output or --run-dir, not both")
        write_live_layout(dep, args.run_dir)
        print(f"rendered {args.deployment} into {args.run_dir}", file=sys.stderr)
        return 0
    text = render(dep)
    if not args.no_validate:
        _validate_text(text)
    if args.output is None:
        sys.stdout.write(text)
    else:
        xds.write_atomically(args.output, text)
    return 0


def _limits(args: argparse.Namespace) -> int:
    text = yaml.safe_dump(ratelimits.service_limits(deploy.load(args.deployment)),
                          sort_keys=False)
    if args.output is None:
        sys.stdout.write(text)
    else:
        xds.write_atomically(args.output, text)
    return 0


def _run(args: argparse.Namespace) -> int:
    dep = deploy.load(args.deployment)
    envoy_yaml = write_live_layout(dep, args.run_dir)
    argv = envoy_command(envoy_yaml, base_id=dep.gateway.edge_port, log_level=args.log_level)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)  # Envoy takes this process's id: signals reach it directly
    return 0  # not reached


def write_live_layout(dep: Deployment, run_dir: Path) -> Path:
    """What `genmesh up` writes for Envoy, in ``run_dir``: the deployment (API keys
    expanded, owner-only), the xDS files (validated by Envoy first), the dynamic bootstrap
    and the rate-limit service's limits. Returns the bootstrap's path; DeploymentError if
    the deployment is refused."""
    run_dir.mkdir(parents=True, exist_ok=True)
    xds.apply(dep, run_dir / XDS_DIR)
    deploy.save(dep, run_dir / DEPLOYMENT_FILE)
    xds.write_atomically(run_dir / LIMITS_FILE,
                         yaml.safe_dump(ratelimits.service_limits(dep), sort_keys=False))
    envoy_yaml = run_dir / ENVOY_FILE
    xds.write_atomically(envoy_yaml, yaml.safe_dump(
        dynamic_bootstrap(dep, run_dir / XDS_DIR), sort_keys=False))
    return envoy_yaml


def _validate_text(text: str) -> None:
    with tempfile.TemporaryDirectory(prefix="genmesh-render-") as tmp:
        path = Path(tmp) / ENVOY_FILE
        path.write_text(text)
        try:
            validate(path)
        except ValueError as exc:
            raise DeploymentError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m genmesh.commands.gateway``: these commands and `rollout`,
    without the rest of the CLI (and so without PyTorch)."""
    parser = argparse.ArgumentParser(prog="genmesh-gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    rollout.register(_register_actions(parser))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (LookupError, ValueError, FileNotFoundError) as exc:
        print(f"genmesh: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
