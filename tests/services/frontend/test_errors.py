"""How a downstream failure reaches the client (``services/frontend/errors.py``): the
caller's own mistakes as they are, a service down or gone mid-call as UNAVAILABLE naming
it, and only a service's own failure as INTERNAL. The transport failures are the ones
grpc really reports: a worker process SIGKILLed mid-stream behind a real Envoy."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from gateway.envoy import envoy_binary
from genmesh.launcher.ports import free_ports
from genmesh.v1 import worker_pb2_grpc
from services.frontend.errors import PipelineError, is_transport_failure, rpc_error
from services.frontend.routing import Affinity
from services.frontend.stages.generate import Generate
from tests.procs import REPO_ROOT
from tests.services.frontend.stages.fakes import call_of, request

UNAVAILABLE, INTERNAL = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL


def failed(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize(("code", "details", "expected"), [
    # Transport failures, as grpc words them: the service went away mid-call.
    (INTERNAL, "Stream removed (RST_STREAM (Received RST_STREAM with error code 2))",
     (UNAVAILABLE, "the worker is unavailable (Stream removed (RST_STREAM (Received "
                   "RST_STREAM with error code 2))); retry shortly")),
    (grpc.StatusCode.UNKNOWN, "Stream removed (recvmsg:Connection reset by peer (104))",
     (UNAVAILABLE, "the worker is unavailable (Stream removed (recvmsg:Connection reset by "
                   "peer (104))); retry shortly")),
    (INTERNAL, "Received RST_STREAM with error code 2",
     (UNAVAILABLE, "the worker is unavailable (Received RST_STREAM with error code 2); "
                   "retry shortly")),
    (grpc.StatusCode.UNKNOWN, "recvmsg:Connection reset by peer",
     (UNAVAILABLE, "the worker is unavailable (recvmsg:Connection reset by peer); "
                   "retry shortly")),
    (grpc.StatusCode.UNKNOWN, "Received http2 header with status: 500",
     (UNAVAILABLE, "the worker is unavailable (Received http2 header with status: 500); "
                   "retry shortly")),
    (UNAVAILABLE, "Socket closed",
     (UNAVAILABLE, "the worker is unavailable (Socket closed); retry shortly")),
    # The worker's own failures: a bug, reported as such.
    (INTERNAL, "the KV pool is corrupt", (INTERNAL, "the worker failed: the KV pool is corrupt")),
    (grpc.StatusCode.UNKNOWN, "Unexpected <class 'RuntimeError'>: boom",
     (INTERNAL, "the worker failed: Unexpected <class 'RuntimeError'>: boom")),
    (INTERNAL, "cannot parse the reply: Stream removed",  # the words, but not grpc's
     (INTERNAL, "the worker failed: cannot parse the reply: Stream removed")),
    # The caller's own mistakes pass as they are.
    (grpc.StatusCode.INVALID_ARGUMENT, "the prompt has 9000 tokens; the model's context is "
     "8192 tokens", (grpc.StatusCode.INVALID_ARGUMENT, "the prompt has 9000 tokens; the "
                     "model's context is 8192 tokens")),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded",
     (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")),
])
def test_downstream_failures_map_to_what_the_client_can_act_on(code, details, expected):
    error = rpc_error(failed(code, details), "worker")
    assert (error.code, error.message) == expected
    assert is_transport_failure(failed(code, details)) == (
        code != UNAVAILABLE and expected[0] == UNAVAILABLE)


def mesh_listener(port: int, upstream_port: int, admin_port: int) -> dict:
    """A minimal Envoy: one HTTP/2 listener routing every call to one HTTP/2 upstream."""
    router = {"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "mesh", "codec_type": "AUTO", "http_filters": [router],
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "worker", "timeout": "0s"}}]}]}}
    h2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}
    address = {"socket_address": {"address": "127.0.0.1", "port_value": upstream_port}}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{"name": "mesh", "address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}}, "filter_chains": [{"filters": [
                    {"name": "envoy.filters.network.http_connection_manager",
                     "typed_config": manager}]}]}],
            "clusters": [{"name": "worker", "type": "STATIC", "connect_timeout": "1s",
                          "typed_extension_protocol_options": h2, "load_assignment": {
                              "cluster_name": "worker",
                              "endpoints": [{"lb_endpoints": [{"endpoint": {
                                  "address": address}}]}]}}]}}


@contextlib.contextmanager
def started(argv: list[str], log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def wait_for(ready, *, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def envoy_ready(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def worker_serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=0.5)
            return True
        except grpc.FutureTimeoutError:
            return False


async def generate_through(address: str, request_id: str,
                           on_message=None) -> tuple[int, PipelineError]:
    """The generate stage's stream of ``request_id`` through ``address``: the worker
    messages it got before it failed, and how it failed."""
    num_messages = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stage = Generate(worker_pb2_grpc.WorkerStub(channel), affinity=Affinity(),
                         rpc_timeout_s=5.0)
        events = stage.run(call_of(request(request_id=request_id), prompt_ids=[1, 2, 3]))
        with pytest.raises(PipelineError) as err:
            async with contextlib.aclosing(events):
                async for event in events:
                    if hasattr(event, "token_ids"):
                        num_messages += 1
                        if on_message is not None:
                            on_message(num_messages)
    return num_messages, err.value


def test_a_worker_killed_mid_stream_behind_envoy_is_unavailable(tmp_path):
    # Held open together while chosen: three distinct ports (three free_port() calls may
    # return one port twice, and Envoy then cannot bind its listener).
    worker_port, mesh_port, admin_port = free_ports(3)
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(mesh_listener(mesh_port, worker_port, admin_port)))
    envoy = [str(envoy_binary()), "-c", str(config), "--base-id", str(os.getpid() % 100_000),
             "--disable-hot-restart", "--log-level", "warning"]
    worker = [sys.executable, "-m", "tests.services.frontend.dying_worker", str(worker_port)]
    with started(envoy, tmp_path / "envoy.log"), \
            started(worker, tmp_path / "worker.log") as worker_proc:
        wait_for(lambda: envoy_ready(admin_port), what="envoy not ready")
        wait_for(lambda: worker_serving(worker_port), what="the worker does not serve")
        address = f"127.0.0.1:{mesh_port}"

        # The worker's own failure stays INTERNAL, its message intact.
        num_messages, error = asyncio.run(generate_through(address, "abort-1"))
        assert (num_messages, error.code, error.message) == (
            3, INTERNAL, "the worker failed: the KV pool is corrupt")

        # SIGKILLed after its third message: Envoy resets the stream (grpc: INTERNAL,
        # "Stream removed (RST_STREAM ...)"); the client sees UNAVAILABLE, the worker named.
        def kill(num_messages: int) -> None:
            if num_messages == 3:
                worker_proc.send_signal(signal.SIGKILL)

        num_messages, error = asyncio.run(generate_through(address, "hang-1", on_message=kill))
        assert (num_messages, error.code) == (3, UNAVAILABLE)
        assert error.message.startswith("the worker is unavailable (Stream removed")
        assert error.message.endswith("; retry shortly")
