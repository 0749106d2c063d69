"""The health port (``health_port``) of a real ``serve()`` with the mesh's mutual TLS, as
the probes in a service's container call it (deploy/docker/probe.py): the health service
alone, in plaintext, on 127.0.0.1, answering what the TLS port's health service answers;
a probe fails for NOT_SERVING and for a server whose event loop hangs, which the TLS
handshake check cannot see. The HTTP API's equivalent answers GET /healthz."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genmesh.launcher.ports import free_ports
from genmesh.launcher.probes import PROBE_TIMEOUT_S
from genmesh.security import clients, pki
from services.common.http_health import serve_http_health
from services.common.server import serve
from services.common.tls import MeshTls
from tests.deploy.test_probe import PROBE

ECHO = "/genmesh.test.Echo/Say"  # a service of the TLS port, never of the health port


def echo(server: grpc.aio.Server) -> None:
    async def say(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "genmesh.test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)})])


@pytest.fixture(autouse=True)
def no_service_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """probe.py reads the container's variables: none of this machine's may steer it."""
    for key in [k for k in os.environ
                if k.endswith(("_SECRETS_DIR", "_HEALTH_PORT")) and k.startswith("GENMESH_")]:
        monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> pki.Secrets:
    return pki.ensure(tmp_path_factory.mktemp("health-port") / "secrets")


async def probe(*argv: str) -> tuple[int, float]:
    """probe.py's exit status and how long it took, run beside the event loop."""
    t0 = time.monotonic()
    status = await asyncio.to_thread(PROBE.main, list(argv))
    return status, time.monotonic() - t0


async def check(address: str) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_the_health_port_answers_health_alone_on_loopback_and_fails_a_hung_or_stopping_server(
        secrets):
    port, health_port = free_ports(2)
    health_address = f"127.0.0.1:{health_port}"

    async def scenario() -> None:
        stopping, release = asyncio.Event(), asyncio.Event()

        async def on_stop() -> None:  # holds the stop between the TLS port and the health port
            stopping.set()
            await release.wait()

        served = asyncio.create_task(serve(
            name="genmesh.test", address=f"127.0.0.1:{port}", register=echo,
            service_names=["genmesh.test.Echo"], grace_s=1.0, on_stop=on_stop,
            tls=MeshTls(secrets, "cache"), health_port=health_port))
        await until(lambda: _answers(health_address))

        # SERVING, as the TLS port says to Envoy.
        assert await check(health_address) == health_pb2.HealthCheckResponse.SERVING
        assert (await probe("grpc", health_address))[0] == 0
        assert await asyncio.to_thread(_say_as_envoy, f"127.0.0.1:{port}", secrets) == b"hi"
        # The health service alone: the TLS port's other services, reflection included,
        # are not there.
        async with grpc.aio.insecure_channel(health_address) as channel:
            for method in (ECHO, "/grpc.reflection.v1alpha.ServerReflection/"
                                 "ServerReflectionInfo"):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await channel.unary_unary(method)(b"", timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
        # On 127.0.0.1 alone: another address of this machine finds nothing listening.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.2", health_port), timeout=1).close()

        # A hung event loop: the probe fails within its timeout; the TLS handshake check,
        # made by gRPC's own threads, cannot tell.
        results: dict[str, tuple[int, float]] = {}
        threads = [threading.Thread(target=lambda k=kind, a=argv: results.__setitem__(
            k, _timed(PROBE.main, list(a)))) for kind, argv in (
                ("grpc", ["grpc", health_address]),
                ("tls", ["tls", f"127.0.0.1:{port}", "--ca", str(secrets.ca(pki.SERVICE_CA)),
                         "--name", "cache"]))]
        for thread in threads:
            thread.start()
        time.sleep(PROBE_TIMEOUT_S + 2)  # blocks the loop, as a hung service would
        for thread in threads:
            thread.join()
        status, seconds = results["grpc"]
        assert status == 1 and seconds < PROBE_TIMEOUT_S + 1
        assert results["tls"][0] == 0
        assert (await probe("grpc", health_address))[0] == 0

        # A stop begins: NOT_SERVING, and the probe fails.
        os.kill(os.getpid(), signal.SIGTERM)
        await stopping.wait()
        assert await check(health_address) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert (await probe("grpc", health_address))[0] == 1
        release.set()
        await served
        assert not await _answers(health_address)  # closed with the service

    asyncio.run(scenario())


def test_the_images_check_asks_the_health_port_when_the_service_has_one(secrets,
                                                                        monkeypatch):
    """The images' HEALTHCHECK (``grpc`` on the service's own port): with
    GENMESH_<SERVICE>_HEALTH_PORT set, probe.py asks that port in plaintext, not the TLS
    port's handshake; 0 is no health port."""
    port, health_port = free_ports(2)

    async def scenario() -> None:
        served = asyncio.create_task(serve(
            name="genmesh.test", address=f"127.0.0.1:{port}", register=echo,
            service_names=[], grace_s=0.5, tls=MeshTls(secrets, "cache"),
            health_port=health_port))
        await until(lambda: _answers(f"127.0.0.1:{health_port}"))
        own_port = f"127.0.0.1:{port}"
        assert (await probe("grpc", own_port))[0] == 1  # plaintext to the TLS port
        monkeypatch.setenv("GENMESH_CACHE_SECRETS_DIR", str(secrets.directory))
        monkeypatch.setenv("GENMESH_CACHE_HEALTH_PORT", "0")
        assert (await probe("grpc", own_port))[0] == 0  # no health port: the TLS check
        monkeypatch.setenv("GENMESH_CACHE_HEALTH_PORT", str(health_port))
        assert (await probe("grpc", own_port))[0] == 0  # the health port
        monkeypatch.setenv("GENMESH_CACHE_HEALTH_PORT", str(free_ports(1)[0]))
        assert (await probe("grpc", own_port))[0] == 1  # nothing there: no TLS fallback
        os.kill(os.getpid(), signal.SIGTERM)
        await served

    asyncio.run(scenario())


def test_the_http_apis_health_port_answers_healthz_while_ready(monkeypatch):
    [port] = free_ports(1)
    state = {"ready": True}

    async def scenario() -> None:
        server = await serve_http_health(lambda: state["ready"], port=port)
        try:
            url = f"http://127.0.0.1:{port}"
            assert await asyncio.to_thread(_get, f"{url}/healthz") == (200, b'{"status": '
                                                                          b'"serving"}')
            assert await asyncio.to_thread(_get, f"{url}/v1/models") == (404, b'{"status": '
                                                                            b'"not found"}')
            assert (await probe("http", f"{url}/healthz"))[0] == 0
            monkeypatch.setenv("GENMESH_HTTPAPI_HEALTH_PORT", str(port))  # the image's check
            assert (await probe("http", "https://127.0.0.1:50055/healthz"))[0] == 0
            state["ready"] = False  # draining
            assert (await asyncio.to_thread(_get, f"{url}/healthz"))[0] == 503
            assert (await probe("http", f"{url}/healthz"))[0] == 1
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.2", port), timeout=1).close()
        finally:
            server.close()

    asyncio.run(scenario())


async def _answers(address: str) -> bool:
    try:
        return await check(address) == health_pb2.HealthCheckResponse.SERVING
    except grpc.aio.AioRpcError:
        return False


def _say_as_envoy(address: str, secrets: pki.Secrets) -> bytes:
    with clients.channel(address, secrets, identity=pki.GATEWAY, peer="cache") as envoy:
        return envoy.unary_unary(ECHO)(b"hi", timeout=5)


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    t0 = time.monotonic()
    return fn(*args), time.monotonic() - t0


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
