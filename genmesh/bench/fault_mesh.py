"""The mesh under test for the fault suite and the soak: what `genmesh up` runs (the
first version only, no Prometheus), supervised (a killed process is restarted) on free
loopback ports, and what the suite asks of it: pids, health, Envoy's rotation, memory.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from gateway.metrics import admin_stats
from genmesh.launcher.plan import DEFAULT_DEPLOYMENT, PORT_FIELDS, MeshConfig, plan
from genmesh.launcher.ports import free_ports
from genmesh.launcher.supervisor import Supervisor
from genmesh.security import clients, pki
from genmesh.v1 import worker_pb2, worker_pb2_grpc

START_TIMEOUT_S = 300.0


# The fault load's clients retry a refused call after 0.1 s and probe ten times a second:
# up to ~60 calls/s while a process is down, more than deploy/local.yaml's tenant is
# allowed. Rate limits are not what a kill measures; these leave them out of the way.
FAULT_REQUESTS_PER_SECOND = 500
FAULT_REQUESTS_PER_MINUTE = 30_000


def fault_deployment(path: Path, source: Path = DEFAULT_DEPLOYMENT) -> Path:
    """``source`` for the fault suite: its tenants' token budgets dropped (a budget's
    store is Redis, and with ``budget_failure_mode: closed`` every request is refused
    while Redis is down: that configuration working, not what a kill of Redis should
    measure) and their request rates raised (above)."""
    raw = yaml.safe_load(source.read_text())
    for tenant in raw.get("tenants", {}).values():
        tenant.pop("tokens_per_minute", None)
        tenant["requests_per_second"] = FAULT_REQUESTS_PER_SECOND
        if "requests_per_minute" in tenant:
            tenant["requests_per_minute"] = FAULT_REQUESTS_PER_MINUTE
    path.write_text(yaml.safe_dump(raw))
    return path


@dataclass
class Mesh:
    """A supervised mesh; the supervisor polls in a thread of its own."""

    config: MeshConfig
    supervisor: Supervisor

    @property
    def edge_address(self) -> str:
        return self.config.edge_address

    @property
    def admin_url(self) -> str:
        return f"http://{self.config.host}:{self.config.admin_port}"

    @property
    def worker_address(self) -> str:
        return f"{self.config.host}:{self.config.worker_port}"

    def pid(self, name: str) -> int:
        return self.supervisor.procs[name].pid

    def is_serving(self, name: str) -> bool:
        """The process's own probe (gRPC health, Redis PING, ...) says it serves."""
        spec = next(s for s in self.supervisor.specs if s.name == name)
        return spec.probe()

    def is_in_rotation(self, cluster: str) -> bool:
        """Every host of Envoy's ``cluster`` is healthy; True for a process Envoy does
        not route to (Redis)."""
        try:
            stats = admin_stats(self.admin_url, f"^cluster\\.{cluster}\\.membership_",
                                timeout_s=1.0)
        except OSError:
            return False
        total = stats.get(f"cluster.{cluster}.membership_total")
        if total is None:
            return True
        return stats.get(f"cluster.{cluster}.membership_healthy") == total

    def worker_stats(self) -> worker_pb2.WorkerStats:
        # As Envoy, the only caller a worker admits under the mesh's mutual TLS.
        with clients.channel_if_secrets(self.worker_address,
                                        pki.Secrets(self.config.secrets_dir),
                                        identity=pki.GATEWAY, peer="worker") as channel:
            return worker_pb2_grpc.WorkerStub(channel).GetStats(worker_pb2.GetStatsRequest(),
                                                                timeout=5)

    def resident_mib(self) -> dict[str, float]:
        """Resident memory (MiB) of every process, and of each process it started (a
        worker's engine process: ``worker-v1/child-<pid>``)."""
        out: dict[str, float] = {}
        for name, proc in self.supervisor.procs.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                parent = psutil.Process(proc.pid)
                out[name] = parent.memory_info().rss / 2**20
                for child in parent.children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        out[f"{name}/child"] = (out.get(f"{name}/child", 0.0)
                                                + child.memory_info().rss / 2**20)
        return out


@contextlib.contextmanager
def supervised_mesh(run_dir: Path, *, model: str | None = None, dtype: str | None = None,
                    kv_cache_gib: float = 0.5, deployment: Path | None = None,
                    on_event: Any = None, env: dict[str, str] | None = None
                    ) -> Iterator[Mesh]:
    """Start the mesh, wait until every process serves, supervise it until the block
    ends, then stop it (every process, whatever happened). ``env``: variables added to
    every process's environment (services read GENMESH_<SERVICE>_<FIELD>)."""
    ports: dict[str, Any] = dict(zip(PORT_FIELDS, free_ports(len(PORT_FIELDS)), strict=True))
    config = MeshConfig(**ports, model=model, versions=("v1",), dtype=dtype,
                        kv_cache_gib=kv_cache_gib, run_dir=run_dir, log_level="WARNING",
                        with_prometheus=False, deployment=deployment or DEFAULT_DEPLOYMENT)
    supervisor = Supervisor(plan(config), run_dir=run_dir, on_event=on_event, env=env)
    stop = threading.Event()
    # Polled as `genmesh up` polls it (every 0.2 s): its restart times are measured.
    watcher = threading.Thread(target=supervisor.supervise, args=(stop,), name="supervise",
                               daemon=True)
    supervisor.start()
    try:
        supervisor.wait_ready(timeout_s=START_TIMEOUT_S)
        watcher.start()
        yield Mesh(config, supervisor)
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join(timeout=5)
        supervisor.stop()


def wait_for(predicate: Any, *, timeout_s: float, interval_s: float = 0.02) -> float | None:
    """Poll ``predicate`` until true; the monotonic time it was, None after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(interval_s)
    return None
