"""deploy/docker/probe.py's ``tls`` kind against real TLS servers made with the mesh's own
certificates: a port serving as the named identity passes; another identity, another CA,
plaintext or nothing fails. The probe holds no client certificate, as no service
container holds Envoy's."""

from __future__ import annotations

import importlib.util
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from genmesh.security import pki
from services.common.tls import MeshTls
from tests.procs import REPO_ROOT


def load_probe() -> ModuleType:  # a file, not a module of the package
    spec = importlib.util.spec_from_file_location(
        "probe", REPO_ROOT / "deploy" / "docker" / "probe.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PROBE = load_probe()


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> pki.Secrets:
    return pki.ensure(tmp_path_factory.mktemp("probe") / "secrets")


def health_server(credentials: grpc.ServerCredentials | None) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = (server.add_insecure_port("127.0.0.1:0") if credentials is None
            else server.add_secure_port("127.0.0.1:0", credentials))
    server.start()
    return server, port


@pytest.fixture(scope="module")
def cache_address(secrets: pki.Secrets) -> Iterator[str]:
    """A gRPC server with the health service serving mutual TLS as a cache does."""
    server, port = health_server(MeshTls(secrets, "cache").server_credentials())
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture(scope="module")
def httpapi_address(secrets: pki.Secrets) -> Iterator[str]:
    """A TLS server as the HTTP API's (uvicorn's) is: its own certificate, a client
    certificate of gateway-ca required. It never gets one from the probe."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(secrets.cert("httpapi"), secrets.key("httpapi"))
    context.load_verify_locations(secrets.ca(pki.GATEWAY_CA))
    context.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the module's tests are done
                return
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):  # no client certificate: refused, as uvicorn does
                pass

    threading.Thread(target=serve, daemon=True).start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def tls(address: str, ca: Path, name: str) -> int:
    return PROBE.main(["tls", address, "--ca", str(ca), "--name", name])


def free_address() -> str:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_tls_passes_a_port_serving_as_the_named_identity(secrets, cache_address,
                                                         httpapi_address):
    service_ca = secrets.ca(pki.SERVICE_CA)
    assert tls(cache_address, service_ca, "cache") == 0  # gRPC, as every service
    assert tls(httpapi_address, service_ca, "httpapi") == 0  # HTTPS, as the HTTP API


def test_tls_fails_another_identity_another_ca_plaintext_or_nothing(secrets, cache_address,
                                                                    tmp_path):
    service_ca = secrets.ca(pki.SERVICE_CA)
    assert tls(cache_address, service_ca, "frontend") == 1  # a cache answered
    other = pki.ensure(tmp_path / "other")
    assert tls(cache_address, other.ca(pki.SERVICE_CA), "cache") == 1  # another mesh's CA
    assert tls(cache_address, secrets.ca(pki.GATEWAY_CA), "cache") == 1  # not Envoy's CA
    assert tls(cache_address, tmp_path / "missing.pem", "cache") == 1
    plaintext, port = health_server(None)
    try:
        assert tls(f"127.0.0.1:{port}", service_ca, "cache") == 1
    finally:
        plaintext.stop(None)
    assert tls(free_address(), service_ca, "cache") == 1  # nothing listens


def test_a_services_secrets_turn_the_images_grpc_and_http_checks_into_tls(
        secrets, cache_address, monkeypatch, tmp_path):
    """The images' HEALTHCHECK (``grpc``, ``http``) cannot know whether secrets are
    mounted: with the service's secrets directory set, they make its ``tls`` check."""
    for key in [k for k in os.environ if k.endswith("_SECRETS_DIR")]:
        monkeypatch.delenv(key)
    assert PROBE.main(["grpc", cache_address]) == 1  # plaintext: the TLS port refuses it
    monkeypatch.setenv("GENMESH_CACHE_SECRETS_DIR", str(secrets.directory))
    assert PROBE.main(["grpc", cache_address]) == 0
    assert PROBE.main(["http", f"http://{cache_address}/healthz"]) == 0
    monkeypatch.delenv("GENMESH_CACHE_SECRETS_DIR")
    monkeypatch.setenv("GENMESH_FRONTEND_SECRETS_DIR", str(secrets.directory))
    assert PROBE.main(["grpc", cache_address]) == 1  # a cache answered, not a frontend
    monkeypatch.setenv("GENMESH_FRONTEND_SECRETS_DIR", str(pki.ensure(tmp_path / "o").directory))
    assert PROBE.main(["grpc", cache_address]) == 1  # a certificate of another CA


def test_the_plaintext_grpc_kind_still_asks_the_health_service(monkeypatch):
    for key in [k for k in os.environ if k.endswith("_SECRETS_DIR")]:
        monkeypatch.delenv(key)
    server, port = health_server(None)
    try:
        assert PROBE.main(["grpc", f"127.0.0.1:{port}"]) == 0
    finally:
        server.stop(None)
    assert PROBE.main(["grpc", free_address()]) == 1


def test_own_identity_reads_the_services_variable():
    assert PROBE.own_identity({"GENMESH_WORKER_SECRETS_DIR": "/s", "PATH": "/bin"}) == (
        "worker", Path("/s"))
    assert PROBE.own_identity({"GENMESH_WORKER_SECRETS_DIR": ""}) is None
    assert PROBE.own_identity({}) is None


def test_own_health_port_reads_the_services_variable_zero_is_none():
    assert PROBE.own_health_port({"GENMESH_CACHE_HEALTH_PORT": "9204", "PATH": "/bin"}) == 9204
    assert PROBE.own_health_port({"GENMESH_CACHE_HEALTH_PORT": "0"}) is None
    assert PROBE.own_health_port({"GENMESH_CACHE_HEALTH_PORT": ""}) is None
    assert PROBE.own_health_port({"GENMESH_CACHE_PORT": "50054"}) is None
