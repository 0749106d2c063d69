"""Envoy's side of the mesh's mutual TLS (the files: ``genmesh/security/pki.py``).

- Towards every genmesh service (its cluster): TLS with Envoy's certificate, trusting
  service-ca alone and requiring the endpoint's URI SAN to be that service's identity, so
  a process that took a service's port without its key gets no call.
- On the mesh listener: TLS with Envoy's certificate; a client must present a certificate
  of service-ca (a plaintext connection, or any other certificate, fails the handshake);
  which identity may call which rpc is ``gateway/rbac.py``.
Envoy reads the files by name: ``/config_dump`` shows paths, never key material.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.core import typed
from genmesh.security import pki

TLS_SOCKET = "envoy.transport_sockets.tls"
GRPC_ALPN = ("h2",)
HTTP1_ALPN = ("http/1.1",)


def _certificate(secrets_dir: str) -> dict[str, Any]:
    if not secrets_dir:
        raise ValueError("security.mtls needs security.secrets_dir: where Envoy reads its "
                         "certificate and the CAs' (`genmesh secrets init DIR` makes them; "
                         "`genmesh up` sets its run directory's)")
    s = pki.Secrets(Path(secrets_dir))
    return {"certificate_chain": {"filename": str(s.cert(pki.GATEWAY))},
            "private_key": {"filename": str(s.key(pki.GATEWAY))}}


def _trusted(secrets_dir: str, ca: str) -> dict[str, Any]:
    return {"filename": str(pki.Secrets(Path(secrets_dir)).ca(ca))}


def upstream_tls(secrets_dir: str, identity: str, *,
                 alpn: tuple[str, ...] = GRPC_ALPN) -> dict[str, Any]:
    """A cluster's transport socket: mutual TLS to an endpoint that is ``identity``."""
    return {"name": TLS_SOCKET, "typed_config": typed(
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        sni=pki.target_name(identity),
        common_tls_context={
            "tls_certificates": [_certificate(secrets_dir)],
            "validation_context": {
                "trusted_ca": _trusted(secrets_dir, pki.SERVICE_CA),
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"exact": pki.spiffe_id(identity)}}]},
            "alpn_protocols": list(alpn)})}


def downstream_tls(secrets_dir: str) -> dict[str, Any]:
    """The mesh listener's transport socket: mutual TLS, clients of service-ca only."""
    return {"name": TLS_SOCKET, "typed_config": typed(
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        require_client_certificate=True,
        common_tls_context={
            "tls_certificates": [_certificate(secrets_dir)],
            "validation_context": {"trusted_ca": _trusted(secrets_dir, pki.SERVICE_CA)},
            "alpn_protocols": list(GRPC_ALPN)})}
