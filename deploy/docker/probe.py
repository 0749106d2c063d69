"""Container health checks and Envoy's drain, with the launcher's own probes.

    python deploy/docker/probe.py grpc 127.0.0.1:50051     gRPC health: exit 0 when SERVING
    python deploy/docker/probe.py http http://127.0.0.1:9901/ready    exit 0 on HTTP 200
    python deploy/docker/probe.py tls 127.0.0.1:50051 --ca .../service-ca.pem --name frontend
                                                 exit 0 when it serves TLS as frontend
    python deploy/docker/probe.py drain http://127.0.0.1:9901 --seconds 15

A service with the mesh's secrets admits Envoy's certificate alone, one no service
container holds, so its probes (docker-compose's healthchecks, the Kubernetes exec probes)
call its health port instead: ``health_port`` (``GENMESH_<SERVICE>_HEALTH_PORT``), a
plaintext port on the container's 127.0.0.1 that answers the gRPC health service alone
(the HTTP API: GET /healthz), with the same status Envoy's checks see, so
``grpc 127.0.0.1:<health_port>`` fails for NOT_SERVING (a stop under way) and, since the
port is served on the service's event loop, for a process that hangs (by the timeout).

``tls`` is what is left without a health port: a TLS handshake with the service's port
must show a valid certificate of the CA ``--ca`` whose URI SAN is
``spiffe://genmesh.local/<name>``. It sends no client certificate: with TLS 1.3 the
client's handshake completes before the server checks it, so the probe passes and the
server then refuses the connection. It says "up and serving TLS as itself" only: a hung
event loop or a NOT_SERVING status passes it (gRPC's own threads make the handshake).

``grpc`` and ``http`` are also what the images' HEALTHCHECK runs (on the service's own
port), which cannot know how the container is configured: where its service has a health
port (``GENMESH_<SERVICE>_HEALTH_PORT`` set and not 0) they ask that port instead, in
plaintext; else, where it has secrets (``GENMESH_<SERVICE>_SECRETS_DIR``), they make the
``tls`` check of the same port as that service.

``drain`` (Envoy's preStop in Kubernetes) asks Envoy to drain its listeners gracefully
(HTTP/2 GOAWAY, so clients reconnect elsewhere) and waits, so streams in flight can end
before the pod's SIGTERM.

Exit status 1 means unhealthy: any status but SERVING or HTTP 200 (urllib raises on 503),
a refused connection, a failed handshake, another identity's certificate or a timeout.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from cryptography import x509

# Runs as a file (`python deploy/docker/probe.py`) from anywhere: the repository's
# packages are found from here, as they are with PYTHONPATH=/app in the images.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from genmesh.launcher.probes import PROBE_TIMEOUT_S, GrpcHealth, HttpReady
from genmesh.security import pki

LOOPBACK = "127.0.0.1"  # where a service's health port listens (services/common/)


def drain(admin_url: str, *, seconds: float) -> bool:
    """Start Envoy's graceful drain of every listener, then wait ``seconds``."""
    request = urllib.request.Request(f"{admin_url}/drain_listeners?graceful", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as reply:
            ok = reply.status == 200
    except (urllib.error.URLError, OSError):
        ok = False
    time.sleep(seconds)
    return ok


def own_identity(environ: dict[str, str]) -> tuple[str, Path] | None:
    """The service this container runs and its secrets directory, when it has one."""
    for key, value in environ.items():
        match = re.fullmatch(r"GENMESH_([A-Z]+)_SECRETS_DIR", key)
        if match and value:
            return match.group(1).lower(), Path(value)
    return None


def own_health_port(environ: dict[str, str]) -> int | None:
    """The health port of the service this container runs, when it has one."""
    for key, value in environ.items():
        if re.fullmatch(r"GENMESH_[A-Z]+_HEALTH_PORT", key) and value.strip() not in ("", "0"):
            return int(value)
    return None


def serves_tls_as(address: str, *, ca: Path, name: str) -> bool:
    """A TLS handshake with ``address`` (host:port) shows a valid certificate of ``ca``
    naming the identity ``name`` (its URI SAN, as Envoy checks it)."""
    host, _, port = address.rpartition(":")
    try:
        context = ssl.create_default_context(cafile=str(ca))
        context.check_hostname = False  # the URI SAN names a service, not the address
        with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S) as raw, \
                context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    except (ssl.SSLError, OSError, ValueError):
        return False
    if der is None:
        return False
    try:
        sans = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return pki.spiffe_id(name) in sans.get_values_for_type(x509.UniformResourceIdentifier)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kinds = parser.add_subparsers(dest="kind", required=True)
    kinds.add_parser("grpc", help="the standard gRPC health service").add_argument("address")
    kinds.add_parser("http", help="an HTTP endpoint answering 200").add_argument("url")
    tls_p = kinds.add_parser("tls", help="the port serves TLS as a mesh identity")
    tls_p.add_argument("address")
    tls_p.add_argument("--ca", type=Path, required=True, help="the CA that signed it")
    tls_p.add_argument("--name", required=True, help="its identity, e.g. frontend")
    drain_p = kinds.add_parser("drain", help="drain Envoy's listeners, then wait")
    drain_p.add_argument("admin_url")
    drain_p.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args(argv)
    own, health_port = own_identity(dict(os.environ)), own_health_port(dict(os.environ))
    if args.kind == "grpc" and health_port is not None:
        healthy = GrpcHealth(f"{LOOPBACK}:{health_port}")()
    elif args.kind == "http" and health_port is not None:
        healthy = HttpReady(urllib.parse.urlsplit(args.url)._replace(
            scheme="http", netloc=f"{LOOPBACK}:{health_port}").geturl())()
    elif args.kind in ("grpc", "http") and own is not None:
        name, secrets = own
        address = args.address if args.kind == "grpc" else urllib.parse.urlsplit(args.url).netloc
        healthy = serves_tls_as(address, ca=pki.Secrets(secrets).ca(pki.SERVICE_CA), name=name)
    elif args.kind == "tls":
        healthy = serves_tls_as(args.address, ca=args.ca, name=args.name)
    elif args.kind == "grpc":
        healthy = GrpcHealth(args.address)()
    elif args.kind == "http":
        healthy = HttpReady(args.url)()
    else:
        healthy = drain(args.admin_url, seconds=args.seconds)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
