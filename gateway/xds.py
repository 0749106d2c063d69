"""Live configuration: the deployment rendered into Envoy's xDS files, swapped atomically.

``apply`` is the only writer of the xDS directory. A change goes live only after it passed
our own checks (``deployment.check``) and ``envoy --mode validate`` on the complete static
rendering of the same resources; each file is then written beside its target and renamed
onto it, which is what Envoy watches for. A refused change leaves every file, and so the
running configuration, as it was.

Files (one DiscoveryResponse each): ``clusters.yaml``, ``listeners.yaml``,
``routes-edge.yaml``, ``routes-mesh.yaml``. Clusters are written first, so a route never
points at a cluster Envoy does not know yet.

``apply_live`` also waits until the running Envoy has taken the change: each file carries
a new ``version_info``, and each of Envoy's subscriptions (CDS, LDS, one RDS per route
table) sets its ``version`` gauge to a hash of the last version it accepted, so a change
is live once every gauge has moved.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from gateway.envoy import render, resources, validate
from gateway.metrics import admin_stats, admin_url
from genmesh.core.deployment import Deployment, DeploymentError, check

TYPES = {
    "clusters": "envoy.config.cluster.v3.Cluster",
    "listeners": "envoy.config.listener.v3.Listener",
    "routes": "envoy.config.route.v3.RouteConfiguration",
}


def verify(dep: Deployment) -> None:
    """Raise DeploymentError unless ``dep`` passes our checks and Envoy's validation."""
    problems = check(dep)
    if problems:
        raise DeploymentError("refused: " + "; ".join(problems))
    with tempfile.TemporaryDirectory(prefix="genmesh-validate-") as tmp:
        static = Path(tmp) / "envoy.yaml"
        static.write_text(render(dep))
        try:
            validate(static)
        except ValueError as exc:
            raise DeploymentError(f"refused: {exc}") from None


def files(dep: Deployment, xds_dir: Path) -> dict[str, dict[str, Any]]:
    """File name → DiscoveryResponse, in the order they must be written."""
    version = str(time.time_ns())
    res = resources(dep, rds_dir=xds_dir)

    def response(kind: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"version_info": version,
                "resources": [{"@type": f"type.googleapis.com/{TYPES[kind]}", **item}
                              for item in items]}

    out = {"clusters.yaml": response("clusters", res.clusters)}
    for config in res.route_configs:
        out[f"routes-{config['name']}.yaml"] = response("routes", [config])
    out["listeners.yaml"] = response("listeners", res.listeners)
    return out


def apply(dep: Deployment, xds_dir: Path) -> None:
    """Verify ``dep``, then make it Envoy's live configuration; DeploymentError if refused."""
    verify(dep)
    xds_dir.mkdir(parents=True, exist_ok=True)
    for name, content in files(dep, xds_dir).items():
        write_atomically(xds_dir / name, yaml.safe_dump(content, sort_keys=False))


# The subscriptions' version gauges: cluster_manager.cds.version,
# listener_manager.lds.version, http.<prefix>.rds.<route table>.version.
_VERSION_STATS = r"(\.cds|\.lds|\.rds\.[^.:]+)\.version$"
ADMIN_TIMEOUT_S = 1.0
POLL_S = 0.02


def apply_live(dep: Deployment, xds_dir: Path, *, timeout_s: float = 5.0) -> bool:
    """``apply``, then wait until the running Envoy (``dep``'s admin) has taken every file.
    True once it has; False if it did not say so within ``timeout_s`` or its admin does
    not answer (the files are written either way). DeploymentError if refused."""
    url = admin_url(dep.gateway)
    before = subscription_versions(url)
    apply(dep, xds_dir)
    if not before:
        return False
    deadline = time.monotonic() + timeout_s
    while True:
        now = subscription_versions(url)
        if all(now.get(name, value) != value for name, value in before.items()):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)


def subscription_versions(url: str) -> dict[str, int]:
    """Each xDS subscription's version gauge; empty if the admin does not answer."""
    try:
        return admin_stats(url, _VERSION_STATS, timeout_s=ADMIN_TIMEOUT_S)
    except OSError:
        return {}


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
