"""A change is live once every xDS subscription of the running Envoy has moved its
version gauge (gateway/xds.py ``apply_live``), against a stand-in admin endpoint."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from gateway import xds
from genmesh.core.deployment import Deployment
from tests.gateway.test_envoy import local_config
from tests.procs import free_port

GAUGES = {"cluster_manager.cds.version": 11, "listener_manager.lds.version": 12,
          "http.edge.rds.edge.version": 13, "http.mesh.rds.mesh.version": 14}
OTHER_STATS = {"cluster_manager.cds.update_success": 3, "http.edge.rds.edge.version_text": 1,
               "cluster.worker-v1.version": 7}


class Admin:
    """Envoy's /stats as far as apply_live reads it: ``gauges`` moved by ``on_apply``."""

    def __init__(self) -> None:
        self.gauges = dict(GAUGES)
        self.filters: list[str] = []
        admin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlparse(self.path).query)
                admin.filters += query.get("filter", [])
                body = "".join(f"{k}: {v}\n" for k, v in {**admin.gauges, **OTHER_STATS}.items())
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def admin() -> Iterator[Admin]:
    a = Admin()
    try:
        yield a
    finally:
        a.server.shutdown()


def deployment(admin_port: int) -> Deployment:
    return local_config(admin_port=admin_port)


def test_the_version_gauges_alone_are_read(admin: Admin) -> None:
    assert xds.subscription_versions(f"http://127.0.0.1:{admin.port}") == GAUGES
    assert admin.filters == [xds._VERSION_STATS]  # Envoy filters them too


def test_a_change_is_live_once_every_subscription_moved(admin, monkeypatch, tmp_path) -> None:
    applied = []

    def apply(dep: Deployment, xds_dir: Path) -> None:
        applied.append(xds_dir)

        def take() -> None:  # Envoy takes the files one by one
            for name in GAUGES:
                time.sleep(0.05)
                admin.gauges[name] += 100
        threading.Thread(target=take).start()

    monkeypatch.setattr(xds, "apply", apply)
    t0 = time.monotonic()
    assert xds.apply_live(deployment(admin.port), tmp_path, timeout_s=5)
    assert 0.2 <= time.monotonic() - t0 < 2
    assert applied == [tmp_path]


def test_a_subscription_that_never_moves_is_not_live(admin, monkeypatch, tmp_path) -> None:
    def apply(dep: Deployment, xds_dir: Path) -> None:
        for name in list(GAUGES)[:3]:  # the mesh's route table is never taken
            admin.gauges[name] += 1

    monkeypatch.setattr(xds, "apply", apply)
    t0 = time.monotonic()
    assert not xds.apply_live(deployment(admin.port), tmp_path, timeout_s=0.3)
    assert 0.3 <= time.monotonic() - t0 < 2


def test_without_an_admin_the_files_are_written_and_nothing_is_confirmed(monkeypatch,
                                                                         tmp_path) -> None:
    applied = []
    monkeypatch.setattr(xds, "apply", lambda dep, xds_dir: applied.append(xds_dir))
    t0 = time.monotonic()
    assert not xds.apply_live(deployment(free_port()), tmp_path, timeout_s=5)
    assert applied == [tmp_path] and time.monotonic() - t0 < 1.5
