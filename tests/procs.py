"""Start real service processes for end-to-end tests, on free loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genmesh.launcher.ports import free_ports

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    return free_ports(1)[0]


def wait_serving(address: str, timeout: float = 120.0, proc: subprocess.Popen | None = None
                 ) -> None:
    """Poll the standard health service until it answers SERVING."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode} before serving")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not serving after {timeout} s")
            time.sleep(0.2)


@contextmanager
def service(module: str, args: list[str], *, port: int, log_path: Path,
            env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Run ``python -m module args`` until the block ends; SIGTERM, then SIGKILL."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO_ROOT,
                                stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        try:
            wait_serving(f"127.0.0.1:{port}", proc=proc)
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
