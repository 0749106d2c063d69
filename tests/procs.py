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

from genmesh.launcher.plan import MeshConfig, plan
from genmesh.launcher.ports import free_ports
from genmesh.launcher.probes import RedisPing
from genmesh.launcher.supervisor import Supervisor, terminate

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    return free_ports(1)[0]


def wait_serving(address: str, timeout: float = 120.0, proc: subprocess.Popen | None = None,
                 channel: grpc.Channel | None = None) -> None:
    """Poll the standard health service until it answers SERVING (on ``channel``, a TLS
    one, when given)."""
    deadline = time.monotonic() + timeout
    # Reconnect within 0.1 s: gRPC's default backoff after a refused connection (1 s,
    # growing) would hold every start-up a second past the server's readiness.
    fast_retry = [("grpc.initial_reconnect_backoff_ms", 100),
                  ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 200)]
    with channel or grpc.insecure_channel(address, options=fast_retry) as channel:
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
            env: dict[str, str] | None = None, channel: grpc.Channel | None = None
            ) -> Iterator[subprocess.Popen]:
    """Run ``python -m module args`` until the block ends; SIGTERM, then SIGKILL.
    ``channel``: how its health is asked (a TLS service's); None: plaintext."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO_ROOT,
                                stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        try:
            wait_serving(f"127.0.0.1:{port}", proc=proc, channel=channel)
            yield proc
        finally:
            terminate(proc, grace_s=20)


class RedisServer:
    """A real redis-server without persistence on a free loopback port, which a test may
    kill, restart on the same port (empty), or pause (connected, but answering nothing)."""

    def __init__(self, binary: Path, log_path: Path) -> None:
        self.binary, self.log_path = binary, log_path
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.binary), "--save", "", "--appendonly", "no", "--port", str(self.port),
                 "--bind", "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT)
        answers = RedisPing("127.0.0.1", self.port)
        deadline = time.monotonic() + 10
        while not answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {self.log_path}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL ends a paused server too
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


@contextmanager
def launched(config: MeshConfig, *, timeout_s: float = 180.0) -> Iterator[Supervisor]:
    """The processes ``genmesh up`` would run for ``config``, serving, until the block
    ends; then stopped in order."""
    supervisor = Supervisor(plan(config), run_dir=config.run_dir)
    supervisor.start()
    try:
        supervisor.wait_ready(timeout_s=timeout_s)
        yield supervisor
    finally:
        supervisor.stop()
