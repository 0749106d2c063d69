"""SIGTERM to the frontend: it stops taking calls but finishes the streams in flight."""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from genmesh.client import Client, GenmeshError
from genmesh.security import clients, pki
from tests.procs import free_port, service


def test_sigterm_finishes_in_flight_streams_then_exits(mesh, tmp_path):
    port = free_port()
    # A second frontend of the mesh: its calls through the mesh listener as `frontend`,
    # this test calling it as Envoy (the only caller a frontend admits).
    args = ["--port", str(port), "--tokenizer-address", mesh.config.mesh_address,
            "--worker-address", mesh.config.mesh_address, "--model", mesh.model,
            "--secrets-dir", str(mesh.config.secrets_dir), "--shutdown-grace-s", "30"]
    address = f"127.0.0.1:{port}"
    as_envoy = {"credentials": clients.credentials(mesh.secrets, identity=pki.GATEWAY,
                                                   peer="frontend"),
                "options": tuple(clients.options("frontend"))}
    with service("services.frontend.main", args, port=port, log_path=tmp_path / "frontend.log",
                 channel=clients.channel(address, mesh.secrets, identity=pki.GATEWAY,
                                         peer="frontend")) as proc, \
            Client(address, timeout_s=60, **as_envoy) as client:
        stream = client.generate_stream("Write a long story.", max_tokens=48, ignore_eos=True)
        chunks = [next(stream), next(stream)]
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(GenmeshError) as refused:
            client.generate("a new call after SIGTERM", max_tokens=2)
        chunks += list(stream)
        assert proc.wait(timeout=30) == 0
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 48
    logs = (tmp_path / "frontend.log").read_text()
    assert '"msg": "stopping"' in logs and '"msg": "stopped"' in logs
