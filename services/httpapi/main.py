"""Entry point: ``python -m services.httpapi.main [--flags]`` (or GENMESH_HTTPAPI_* env).

uvicorn serves the app; on SIGTERM/SIGINT the service first reports itself draining
(``/healthz`` 503, so the gateway stops sending), stops accepting connections, lets the
requests in flight (streams included) finish for ``shutdown_grace_s``, then exits.
"""

from __future__ import annotations

import contextlib
import signal
import ssl
import sys
from collections.abc import Iterator
from types import FrameType

import uvicorn

from genmesh.security import pki
from genmesh.v1 import generation_pb2_grpc
from services.common.http_health import serve_http_health
from services.common.server import run_service
from services.common.telemetry import settings_from, setup
from services.common.tls import MeshTls
from services.httpapi.app import HttpApi
from services.httpapi.config import HttpApiConfig


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app it drains when a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, api: HttpApi) -> None:
        super().__init__(config)
        self.api = api

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.api.drain()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT start the graceful stop; unlike uvicorn's own, the signal
        is not raised again afterwards, so a drained service exits 0 as every genmesh
        service does (its supervisor reads a signal death as a crash)."""
        handlers = {sig: signal.signal(sig, self.handle_exit)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


async def run(cfg: HttpApiConfig) -> None:
    telemetry = setup(settings_from("genmesh-httpapi", cfg))
    tls = MeshTls.of(cfg)
    channel = telemetry.channel(cfg.frontend_address, tls)
    api = HttpApi(generation_pb2_grpc.GenerationStub(channel), max_request_s=cfg.max_request_s,
                  max_body_bytes=cfg.max_body_bytes)
    server = _DrainingServer(uvicorn.Config(
        api.app(), host=cfg.host, port=cfg.port, lifespan="off", access_log=False,
        log_config=None, timeout_graceful_shutdown=int(cfg.shutdown_grace_s),
        # Envoy keeps its upstream connections open; a longer keep-alive than its idle
        # timeout avoids resets on reuse.
        timeout_keep_alive=75,
        # With the mesh's secrets: this service's certificate, and a handshake only with
        # a client holding one of gateway-ca (Envoy), as the gRPC services do.
        ssl_keyfile=None if tls is None else str(tls.secrets.key(tls.identity)),
        ssl_certfile=None if tls is None else str(tls.secrets.cert(tls.identity)),
        ssl_ca_certs=None if tls is None else str(tls.secrets.ca(pki.GATEWAY_CA)),
        ssl_cert_reqs=ssl.CERT_NONE if tls is None else ssl.CERT_REQUIRED), api)
    # Ready once uvicorn listens, until the drain begins.
    probes = None if cfg.health_port == 0 else await serve_http_health(
        lambda: server.started and not api.is_draining, port=cfg.health_port)
    try:
        await server.serve()
    finally:
        if probes is not None:
            probes.close()
        await channel.close()
        telemetry.shutdown()


def main(argv: list[str] | None = None) -> int:
    return run_service(HttpApiConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
