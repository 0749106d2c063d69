"""A real Envoy, rendered by gateway.envoy, in front of real gRPC stand-in servers.

The stand-ins serve the standard health service and a generic ``Echo`` (unary),
``Count`` (server stream), ``Sleep`` (unary, stops early when cancelled) and
``RequestId`` (unary) on bytes, under the service names the routes expect, so no
generated genmesh code is needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.envoy import envoy_command, render, validate
from genmesh.core.deployment import Deployment, GatewaySettings, ModelVersion, Rollout, Services
from tests.procs import free_port

MAX_REQUEST_BYTES = 64 * 1024
STARTUP_TIMEOUT_S = 15.0


@dataclass
class StandIn:
    """One gRPC server answering as ``service``."""

    service: str
    server: grpc.Server
    port: int
    health: health.HealthServicer
    # Seconds each Sleep call actually ran before it returned or saw its cancellation.
    sleep_durations_s: list[float] = field(default_factory=list)


def start_stand_in(service: str) -> StandIn:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=[("grpc.so_reuseport", 0)])
    port = server.add_insecure_port("127.0.0.1:0")
    stand_in = StandIn(service, server, port, health.HealthServicer())
    health_pb2_grpc.add_HealthServicer_to_server(stand_in.health, server)

    def echo(request: bytes, context) -> bytes:
        return f"{service}:".encode() + request

    def count(request: bytes, context) -> Iterator[bytes]:
        for i in range(3):
            yield f"{i}:".encode() + request

    def sleep(request: bytes, context) -> bytes:
        started = time.monotonic()
        while context.is_active() and time.monotonic() - started < float(request):
            time.sleep(0.01)
        stand_in.sleep_durations_s.append(time.monotonic() - started)
        return b"slept"

    def request_id(request: bytes, context) -> bytes:
        return dict(context.invocation_metadata()).get("x-request-id", "").encode()

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Sleep": grpc.unary_unary_rpc_method_handler(sleep),
        "RequestId": grpc.unary_unary_rpc_method_handler(request_id),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, handlers)])
    server.start()
    return stand_in


def wait_until(attempt: Callable[[], object], *, timeout: float, what: str) -> None:
    """Call ``attempt`` until it stops raising, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            attempt()
            return
        except Exception as error:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} after {timeout} s: {error}") from error
            time.sleep(0.05)


def wait_ready(admin_port: int, proc: subprocess.Popen) -> None:
    def ready() -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"envoy exited with {proc.returncode}")
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as reply:
            assert reply.status == 200

    wait_until(ready, timeout=STARTUP_TIMEOUT_S, what="envoy not ready")


@contextmanager
def running_envoy(cfg: Deployment, workdir: Path) -> Iterator[Path]:
    """Serve ``cfg`` until the block ends; yields the file Envoy's stdout (access log) goes to."""
    config_path = workdir / "envoy.yaml"
    config_path.write_text(render(cfg))
    validate(config_path)
    stdout_path, stderr_path = workdir / "envoy.stdout", workdir / "envoy.stderr"
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(envoy_command(config_path, base_id=os.getpid() % 100_000),
                                stdout=stdout, stderr=stderr)
        try:
            wait_ready(cfg.gateway.admin_port, proc)
            yield stdout_path
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def wait_reachable(channel: grpc.Channel, service: str) -> None:
    """Envoy routes to a host only once a health check has passed (~1 s after it serves)."""
    echo = channel.unary_unary(f"/{service}/Echo")
    wait_until(lambda: echo(b"", timeout=1), timeout=STARTUP_TIMEOUT_S,
               what=f"{service} not reachable through envoy")


@dataclass
class Mesh:
    cfg: Deployment
    frontend: StandIn
    tokenizer: StandIn
    edge: grpc.Channel
    mesh: grpc.Channel


def make_config(frontend: StandIn, tokenizer: StandIn) -> Deployment:
    """Ports of a fresh local mesh without tenants; the worker's port has nothing listening."""
    return Deployment(
        model="m", versions=(ModelVersion("v1", (("127.0.0.1", free_port()),)),),
        rollout=Rollout(primary="v1"),
        services=Services(frontend=(("127.0.0.1", frontend.port),),
                          tokenizer=(("127.0.0.1", tokenizer.port),)),
        gateway=GatewaySettings(edge_port=free_port(), mesh_port=free_port(),
                                admin_port=free_port(), max_request_bytes=MAX_REQUEST_BYTES))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[Mesh]:
    frontend = start_stand_in("genmesh.v1.Generation")
    tokenizer = start_stand_in("genmesh.v1.Tokenizer")
    cfg = make_config(frontend, tokenizer)
    try:
        with running_envoy(cfg, tmp_path_factory.mktemp("envoy")), \
                grpc.insecure_channel(f"127.0.0.1:{cfg.gateway.edge_port}") as edge, \
                grpc.insecure_channel(f"127.0.0.1:{cfg.gateway.mesh_port}") as mesh_channel:
            wait_reachable(edge, "genmesh.v1.Generation")
            wait_reachable(mesh_channel, "genmesh.v1.Tokenizer")
            yield Mesh(cfg, frontend, tokenizer, edge, mesh_channel)
    finally:
        frontend.server.stop(grace=None)
        tokenizer.server.stop(grace=None)


def test_unary_and_server_stream_pass_through_the_edge(mesh):
    assert mesh.edge.unary_unary("/genmesh.v1.Generation/Echo")(b"hi", timeout=5) == (
        b"genmesh.v1.Generation:hi")
    replies = list(mesh.edge.unary_stream("/genmesh.v1.Generation/Count")(b"x", timeout=5))
    assert replies == [b"0:x", b"1:x", b"2:x"]


def test_unary_and_server_stream_pass_through_the_mesh(mesh):
    assert mesh.mesh.unary_unary("/genmesh.v1.Tokenizer/Echo")(b"hi", timeout=5) == (
        b"genmesh.v1.Tokenizer:hi")
    replies = list(mesh.mesh.unary_stream("/genmesh.v1.Tokenizer/Count")(b"y", timeout=5))
    assert replies == [b"0:y", b"1:y", b"2:y"]


def test_edge_health_check_reaches_the_frontend(mesh):
    stub = health_pb2_grpc.HealthStub(mesh.edge)
    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(("listener", "path", "served"), [
    ("edge", "/genmesh.v1.Tokenizer/Echo", "genmesh.v1.Generation"),  # internal service
    ("edge", "/no.such.Service/Call", "genmesh.v1.Generation"),
    ("mesh", "/genmesh.v1.Safety/Check", "genmesh.v1.Tokenizer"),  # safety not configured
])
def test_unrouted_paths_are_unimplemented_and_say_what_is_served(mesh, listener, path, served):
    channel = mesh.edge if listener == "edge" else mesh.mesh
    with pytest.raises(grpc.RpcError) as error:
        channel.unary_unary(path)(b"", timeout=5)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert f"genmesh {listener}: no route" in error.value.details()
    assert served in error.value.details()


def test_a_backend_that_is_down_is_unavailable_at_once(mesh):
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        mesh.mesh.unary_unary("/genmesh.v1.Worker/Generate")(b"", timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no healthy upstream" in error.value.details()
    assert time.monotonic() - started < 1.0


def test_client_deadline_is_honoured_end_to_end(mesh):
    deadline_s = 0.5
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        mesh.edge.unary_unary("/genmesh.v1.Generation/Sleep")(b"5", timeout=deadline_s)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < deadline_s + 0.5
    # The backend's call was torn down at the deadline, not left running for 5 s.
    wait_until(lambda: mesh.frontend.sleep_durations_s[-1], timeout=2,
               what="Sleep handler still running")
    assert mesh.frontend.sleep_durations_s[-1] < deadline_s + 0.5


def test_edge_rejects_a_request_over_max_request_bytes(mesh):
    echo = mesh.edge.unary_unary("/genmesh.v1.Generation/Echo")
    assert echo(b"x" * (MAX_REQUEST_BYTES - 1024), timeout=5).endswith(b"x")
    with pytest.raises(grpc.RpcError) as error:
        echo(b"x" * (MAX_REQUEST_BYTES + 1), timeout=5)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"larger than {MAX_REQUEST_BYTES} bytes" in error.value.details()


def test_request_ids_are_generated_kept_and_returned(mesh):
    on_edge = mesh.edge.unary_unary("/genmesh.v1.Generation/RequestId")
    generated, call = on_edge.with_call(b"", timeout=5)
    assert len(generated) == 36  # a UUID
    assert ("x-request-id", generated.decode()) in call.initial_metadata()
    assert on_edge(b"", timeout=5, metadata=[("x-request-id", "client-7")]) == b"client-7"
    on_mesh = mesh.mesh.unary_unary("/genmesh.v1.Tokenizer/RequestId")
    assert on_mesh(b"", timeout=5, metadata=[("x-request-id", "edge-42")]) == b"edge-42"


def test_a_not_serving_backend_leaves_rotation_and_comes_back(mesh):
    echo = mesh.mesh.unary_unary("/genmesh.v1.Tokenizer/Echo")
    serving = health_pb2.HealthCheckResponse

    def fails_unavailable() -> None:
        try:
            echo(b"", timeout=1)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            return
        raise AssertionError("still routed to a NOT_SERVING backend")

    mesh.tokenizer.health.set("", serving.NOT_SERVING)
    try:
        # NOT_SERVING is a definite answer: out at the next probe (1 s interval).
        wait_until(fails_unavailable, timeout=3, what="backend not taken out")
    finally:
        mesh.tokenizer.health.set("", serving.SERVING)
    wait_until(lambda: echo(b"", timeout=1), timeout=3, what="backend not back")


def test_access_log_has_one_json_line_per_call(tmp_path):
    frontend = start_stand_in("genmesh.v1.Generation")
    tokenizer = start_stand_in("genmesh.v1.Tokenizer")
    cfg = make_config(frontend, tokenizer)
    try:
        with running_envoy(cfg, tmp_path) as access_log, \
                grpc.insecure_channel(f"127.0.0.1:{cfg.gateway.edge_port}") as edge:
            wait_reachable(edge, "genmesh.v1.Generation")
            echo = edge.unary_unary("/genmesh.v1.Generation/Echo")
            echo(b"", timeout=5, metadata=[("x-request-id", "logged-1")])
        # Envoy flushes its stdout when it stops.
        entries = [json.loads(line) for line in access_log.read_text().splitlines()]
    finally:
        frontend.server.stop(grace=None)
        tokenizer.server.stop(grace=None)
    [entry] = [e for e in entries if e["request_id"] == "logged-1"]
    assert entry["listener"] == "edge"
    assert entry["method"] == "POST"
    assert entry["path"] == "/genmesh.v1.Generation/Echo"
    assert entry["grpc_status"] == 0
    assert entry["upstream_cluster"] == "frontend"
    assert isinstance(entry["duration_ms"], int)
