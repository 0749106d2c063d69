"""Dialling the mesh's TLS ports from this side of the mesh's secrets (``pki.py``): who
you are (``identity``) and whom you expect (``peer``) choose the certificate presented,
the CA trusted and the name the peer's certificate must carry.

- A service's own port (``peer`` a service): only Envoy's identity is let in, so probes
  and tests speak there as Envoy (the launcher, which made the CAs, is its owner anyway).
- The mesh listener (``peer`` Envoy): as a service or the operator; Envoy's RBAC decides
  what each may call (``gateway/rbac.py``).
"""

from __future__ import annotations

from typing import Any

import grpc

from genmesh.security import pki


def credentials(secrets: pki.Secrets, *, identity: str, peer: str) -> grpc.ChannelCredentials:
    key, chain = secrets.read(identity)
    ca = pki.GATEWAY_CA if peer == pki.GATEWAY else pki.SERVICE_CA
    return grpc.ssl_channel_credentials(root_certificates=secrets.ca(ca).read_bytes(),
                                        private_key=key, certificate_chain=chain)


def options(peer: str) -> list[tuple[str, Any]]:
    """Whatever address ``peer`` is dialled at, its certificate names it as the target."""
    return [("grpc.ssl_target_name_override", pki.target_name(peer))]


def channel(address: str, secrets: pki.Secrets, *, identity: str, peer: str) -> grpc.Channel:
    return grpc.secure_channel(address, credentials(secrets, identity=identity, peer=peer),
                               options=options(peer))


def channel_if_secrets(address: str, secrets: pki.Secrets, *, identity: str, peer: str
                       ) -> grpc.Channel:
    """``channel`` when ``secrets`` holds ``identity``'s certificate (a mesh with mutual
    TLS); else plaintext (a mesh without it)."""
    if not secrets.cert(identity).exists():
        return grpc.insecure_channel(address)
    return channel(address, secrets, identity=identity, peer=peer)


def aio_channel(address: str, secrets: pki.Secrets, *, identity: str, peer: str
                ) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, credentials(secrets, identity=identity, peer=peer),
                                   options=options(peer))
