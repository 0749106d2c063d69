"""The HTTP API as a process: it serves, and on SIGTERM it fails its health check (on its
port and on its loopback health port), lets the stream in flight finish, and exits 0."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator

import grpc
import httpx

from genmesh.launcher.ports import free_ports
from genmesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.procs import REPO_ROOT


class SlowFrontend(generation_pb2_grpc.GenerationServicer):
    async def GenerateStream(self, request: generation_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        for i in range(20):
            yield generation_pb2.GenerateStreamResponse(text=f"{i} ")
            await asyncio.sleep(0.05)
        yield generation_pb2.GenerateStreamResponse(
            finish_reason=common_pb2.FINISH_REASON_STOP,
            usage=common_pb2.Usage(prompt_tokens=1, completion_tokens=20))


def test_sigterm_drains_then_exits(tmp_path):
    port, metrics_port, health_port = free_ports(3)
    loop = asyncio.new_event_loop()
    server_ready = threading.Event()
    frontend_port: list[int] = []
    stop = asyncio.Event()

    async def serve_frontend() -> None:
        server = grpc.aio.server()
        generation_pb2_grpc.add_GenerationServicer_to_server(SlowFrontend(), server)
        frontend_port.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        server_ready.set()
        await stop.wait()
        await server.stop(0)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve_frontend(),),
                              daemon=True)
    thread.start()
    assert server_ready.wait(10)
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.httpapi.main", "--port", str(port),
         "--metrics-port", str(metrics_port), "--health-port", str(health_port),
         "--frontend-address",
         f"127.0.0.1:{frontend_port[0]}", "--shutdown-grace-s", "10"],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "did not start"
            time.sleep(0.1)
        health = f"http://127.0.0.1:{health_port}/healthz"
        assert httpx.get(health, timeout=5).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{health_port}/v1/models", timeout=5
                         ).status_code == 404  # the health check alone
        assert b"genmesh_http_requests" in httpx.get(
            f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).content
        body = {"model": "m", "prompt": "x", "stream": True}
        texts = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    proc.send_signal(signal.SIGTERM)  # mid-stream
                    texts.append(line)
                    deadline = time.monotonic() + 5
                    while httpx.get(health, timeout=5).status_code != 503:  # draining
                        assert time.monotonic() < deadline, "the health port still says 200"
                        time.sleep(0.02)
                    break
            texts += [line for line in lines if line.startswith("data: ")]
        assert texts[-1] == "data: [DONE]" and len(texts) == 1 + 20 + 1  # every word, then
        assert proc.wait(timeout=20) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
