"""A service's side of the mesh's mutual TLS and Redis users (``genmesh/security/pki.py``
makes the files; this reads its own).

With ``--secrets-dir`` set (``genmesh up`` sets it; compose and Kubernetes mount the
service's secret there):
- the service's port speaks TLS with its own certificate and completes a handshake only
  with a client holding a certificate of ``gateway-ca``, i.e. Envoy: a plaintext call,
  another service or any other certificate is refused before a byte of gRPC;
- its calls into the mesh (the frontend's to Envoy's mesh listener, the HTTP API's) are
  TLS with its own certificate, checking that the other end is Envoy;
- its Redis connections log in as the Redis user named like the service, with that
  user's password (an ACL user allowed only the service's keys).
Without it (a service started alone, in unit tests): plaintext, Redis as given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from genmesh.core.config import ServerConfig
from genmesh.security import clients, pki


@dataclass(frozen=True, slots=True)
class MeshTls:
    secrets: pki.Secrets
    identity: str  # whose certificate this process presents: its service's name

    @classmethod
    def of(cls, cfg: ServerConfig) -> MeshTls | None:
        """``cfg``'s, or None when it has no secrets directory (plaintext)."""
        if not cfg.secrets_dir:
            return None
        return cls(pki.Secrets(Path(cfg.secrets_dir)), cfg.SERVICE)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Serve with this identity's certificate; callers must hold gateway-ca's."""
        return grpc.ssl_server_credentials(
            [self.secrets.read(self.identity)],
            root_certificates=self.secrets.ca(pki.GATEWAY_CA).read_bytes(),
            require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Dial Envoy: trust gateway-ca alone, present this identity's certificate."""
        return clients.credentials(self.secrets, identity=self.identity, peer=pki.GATEWAY)

    @staticmethod
    def channel_options() -> list[tuple[str, Any]]:
        """Whatever address Envoy is dialled at, its certificate names it as the target."""
        return clients.options(pki.GATEWAY)

    def redis_url(self, url: str) -> str:
        """``url`` logging in as this identity's Redis user, when the secrets hold its
        password and the URL names no user of its own."""
        return pki.login(url, self.secrets, self.identity)


def redis_url(cfg: ServerConfig, url: str) -> str:
    """``url`` as ``cfg``'s service logs in to Redis (see ``MeshTls.redis_url``)."""
    tls = MeshTls.of(cfg)
    return url if tls is None else tls.redis_url(url)
