"""Prometheus for the local mesh: the scrape configuration, and how to start the server.

Every genmesh process serves its ``genmesh_*`` series on a metrics port of its own
(``/metrics``, prometheus_client); Envoy serves its ``envoy_*`` series on the admin port
(``/stats/prometheus``). One scrape job per process, named as the launcher names the
process (``frontend``, ``worker-v1``, ...), each with a ``service`` label (the name up to
its first ``-``: ``worker`` for every worker version) so dashboards can group the
replicas and versions of one service.

``deploy/prometheus/prometheus.yml`` is what ``scrape_config`` renders for the default
ports below; a test keeps the two equal.

The server itself is the Debian ``prometheus`` package's (2.x), when it is installed:
``genmesh up`` runs without it.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

# The metrics endpoints of the local mesh's processes at their default ports.
DEFAULT_TARGETS: Mapping[str, Sequence[str]] = {
    "frontend": ["127.0.0.1:9101"],
    "tokenizer": ["127.0.0.1:9102"],
    "safety": ["127.0.0.1:9103"],
    "cache": ["127.0.0.1:9104"],
    "worker-v1": ["127.0.0.1:9161"],
    "worker-v2": ["127.0.0.1:9162"],
    "ratelimit": ["127.0.0.1:9171"],
}
DEFAULT_ENVOY_ADMIN = "127.0.0.1:9901"

ENVOY_JOB = "envoy"
METRICS_PATH = "/metrics"
ENVOY_METRICS_PATH = "/stats/prometheus"
# A local run's history is looked at for minutes, not weeks: a short retention keeps the
# data directory (reused by the next run) small.
DEFAULT_RETENTION = "6h"


def prometheus_binary() -> Path | None:
    """The ``prometheus`` on PATH (``apt install prometheus``), else None."""
    found = shutil.which("prometheus")
    return Path(found) if found else None


def duration(seconds: float) -> str:
    """``seconds`` as a Prometheus duration: whole seconds as ``5s``, else ``250ms``.

    Raises ValueError for a duration Prometheus cannot express (under 1 ms)."""
    millis = round(seconds * 1000)
    if millis < 1:
        raise ValueError(f"a scrape interval must be at least 1 ms, got {seconds} s")
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def _job(name: str, targets: Sequence[str], *, service: str, metrics_path: str) -> dict[str, Any]:
    return {
        "job_name": name,
        "metrics_path": metrics_path,
        "static_configs": [{"targets": list(targets), "labels": {"service": service}}],
    }


def scrape_config(targets: Mapping[str, Sequence[str]], *, envoy_admin: str | None,
                  scrape_interval_s: float = 5.0) -> dict[str, Any]:
    """Prometheus's configuration (a plain dict, for pyyaml) scraping the mesh.

    ``targets`` maps a process name (``frontend``, ``worker-v1``) to the ``host:port`` of
    its metrics endpoints, one job each, in the mapping's order; ``envoy_admin`` is
    Envoy's admin ``host:port`` (None: Envoy is not scraped). A process without
    endpoints gets no job. Raises ValueError for a job name used twice (``envoy``
    included) or an interval under 1 ms."""
    if envoy_admin is not None and ENVOY_JOB in targets:
        raise ValueError(f"the job name {ENVOY_JOB!r} is Envoy's; rename that process")
    interval = duration(scrape_interval_s)
    jobs = [_job(name, endpoints, service=name.partition("-")[0], metrics_path=METRICS_PATH)
            for name, endpoints in targets.items() if endpoints]
    if envoy_admin is not None:
        jobs.append(_job(ENVOY_JOB, [envoy_admin], service=ENVOY_JOB,
                         metrics_path=ENVOY_METRICS_PATH))
    # Rules evaluate at the scrape interval too; the default scrape timeout (10 s, capped
    # at the interval) stands.
    return {"global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": jobs}


def render(config: Mapping[str, Any]) -> str:
    """``config`` as the YAML text of ``prometheus.yml`` (keys in the order built)."""
    return yaml.safe_dump(dict(config), sort_keys=False)


def prometheus_argv(binary: Path, config_file: Path, *, host: str, port: int, data_dir: Path,
                    retention: str = DEFAULT_RETENTION) -> tuple[str, ...]:
    """The command line of a Prometheus 2.x serving on ``host:port`` from ``config_file``,
    keeping its time-series database in ``data_dir`` for ``retention`` (a Prometheus
    duration, e.g. ``6h``)."""
    return (
        str(binary),
        f"--config.file={config_file}",
        f"--web.listen-address={host}:{port}",
        f"--storage.tsdb.path={data_dir}",
        f"--storage.tsdb.retention.time={retention}",
    )
