"""Is a process serving? One probe per kind of server, each bounded by a short timeout."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

PROBE_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class GrpcHealth:
    """The standard gRPC health service answers SERVING (overall, service "")."""

    address: str

    def __call__(self) -> bool:
        with grpc.insecure_channel(self.address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True, slots=True)
class HttpReady:
    """An HTTP endpoint (Envoy's admin ``/ready``) answers 200."""

    url: str

    def __call__(self) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=PROBE_TIMEOUT_S) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False


@dataclass(frozen=True, slots=True)
class EnvoyReady:
    """Envoy's admin says it is ready and every cluster has all its hosts healthy (its
    active gRPC health checks passed), so the first call is not refused."""

    admin_url: str  # e.g. http://127.0.0.1:9901

    def __call__(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.admin_url}/ready",
                                        timeout=PROBE_TIMEOUT_S) as reply:
                if reply.status != 200:
                    return False
            with urllib.request.urlopen(f"{self.admin_url}/stats?filter=membership_",
                                        timeout=PROBE_TIMEOUT_S) as reply:
                stats = reply.read().decode()
        except (urllib.error.URLError, OSError):
            return False
        counts: dict[str, dict[str, int]] = {}
        for line in stats.splitlines():  # "cluster.worker.membership_healthy: 1"
            key, _, value = line.partition(": ")
            parts = key.split(".")
            if len(parts) == 3 and parts[0] == "cluster":
                counts.setdefault(parts[1], {})[parts[2]] = int(value)
        return bool(counts) and all(
            c.get("membership_total", 0) > 0
            and c.get("membership_healthy") == c.get("membership_total")
            for c in counts.values())


@dataclass(frozen=True, slots=True)
class RedisPing:
    """Redis answers PING with PONG (spoken as RESP by hand: no client needed)."""

    host: str
    port: int

    def __call__(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=PROBE_TIMEOUT_S) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False


Probe = GrpcHealth | HttpReady | EnvoyReady | RedisPing
