"""Is a process serving? One probe per kind of server, each bounded by a short timeout."""

from __future__ import annotations

import socket
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.metrics import admin_stats
from genmesh.security import clients, pki

PROBE_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class GrpcHealth:
    """The standard gRPC health service answers SERVING (overall, service "")."""

    address: str
    # With the mesh's secrets: mutual TLS as Envoy (the only caller a service admits) to
    # the service ``identity``; None: plaintext.
    secrets_dir: str | None = None
    identity: str = ""

    def __call__(self) -> bool:
        with (grpc.insecure_channel(self.address) if self.secrets_dir is None
              else clients.channel(self.address, pki.Secrets(Path(self.secrets_dir)),
                                   identity=pki.GATEWAY, peer=self.identity)) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True, slots=True)
class HttpReady:
    """An HTTP endpoint (Envoy's admin ``/ready``) answers 200. An https URL with the
    mesh's secrets: mutual TLS as Envoy, the server's certificate checked against
    service-ca (not its host name: the probe dials an address)."""

    url: str
    secrets_dir: str | None = None

    def __call__(self) -> bool:
        context = None
        if self.secrets_dir is not None:
            secrets = pki.Secrets(Path(self.secrets_dir))
            context = ssl.create_default_context(cafile=secrets.ca(pki.SERVICE_CA))
            context.check_hostname = False
            context.load_cert_chain(secrets.cert(pki.GATEWAY), secrets.key(pki.GATEWAY))
        try:
            with urllib.request.urlopen(self.url, timeout=PROBE_TIMEOUT_S,
                                        context=context) as reply:
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
            stats = admin_stats(self.admin_url, "membership_", timeout_s=PROBE_TIMEOUT_S)
        except OSError:
            return False
        counts: dict[str, dict[str, int]] = {}
        for key, value in stats.items():  # "cluster.worker.membership_healthy": 1
            parts = key.split(".")
            if len(parts) == 3 and parts[0] == "cluster":
                counts.setdefault(parts[1], {})[parts[2]] = value
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
                # With ACL users and the default user off, Redis answers NOAUTH: it is up.
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False


Probe = GrpcHealth | HttpReady | EnvoyReady | RedisPing
