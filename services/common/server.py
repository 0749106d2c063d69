"""What every genmesh gRPC server shares: the entry point (``run_service``), health and
reflection services, socket options, JSON logs, a graceful stop on SIGTERM/SIGINT, and
the loopback health port that container probes call (``serve_health_port``)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, ClassVar, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from genmesh.core.config import ServerConfig
from services.common import streams
from services.common.decoding import DecodeRequests
from services.common.tls import MeshTls

C = TypeVar("C", bound=ServerConfig)

# A stale process on the same port must make bind fail loudly, not share traffic.
SERVER_OPTIONS = [("grpc.so_reuseport", 0)]
LOOPBACK = "127.0.0.1"  # where the health port listens: the container's own probes alone


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any ``extra`` fields
    such as ``request_id``."""

    BUILTIN: ClassVar[frozenset[str]] = frozenset(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items()
                      if k not in self.BUILTIN and not k.startswith("_")})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def run_service(config: type[C], run: Callable[[C], Coroutine[Any, Any, None]],
                argv: list[str] | None = None) -> int:
    """A service's whole entry point (its ``main``): ``config`` built from defaults,
    ``GENMESH_<SERVICE>_<FIELD>`` variables and ``argv``'s flags, JSON logs at its
    ``log_level``, then ``run(cfg)`` (which serves until SIGTERM/SIGINT). Returns the
    exit status."""
    cfg = config.load(argv, os.environ)
    setup_json_logging(f"genmesh.{config.SERVICE}", cfg.log_level)
    asyncio.run(run(cfg))
    return 0


def setup_json_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger(service).debug("logging configured")


def new_server(interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    """A grpc.aio server as every genmesh service runs one. With ``interceptors`` (the
    tracing ones) they run inside the two that end a stream its caller left within its
    own call (``streams.py``), where the spans it made current can be detached. Without
    tracing those two are left out: they cost the mesh ~0.08 CPU-ms per generated token
    (``genmesh bench mesh --quick``: 0.42 -> 0.51 ms, throughput 0.80x -> 0.75x
    in-process), and a stream left that way is still closed, by the event loop's
    async-generator finalizer, soon after its call ends.

    Outermost, always: ``decoding.DecodeRequests``, so a request that cannot be decoded
    ends INVALID_ARGUMENT in every service, never UNKNOWN."""
    if not interceptors:
        return grpc.aio.server(options=SERVER_OPTIONS, interceptors=[DecodeRequests()])
    return grpc.aio.server(options=SERVER_OPTIONS, interceptors=[
        DecodeRequests(), *streams.interceptors(interceptors)])


async def serve_health_port(servicer: health.aio.HealthServicer, *, port: int
                            ) -> grpc.aio.Server:
    """A plaintext server on 127.0.0.1:``port`` with ``servicer`` and nothing else, started.

    With mutual TLS a service admits only Envoy's certificate, which no probe in its
    container holds: this port is what its probes call instead (``probe.py grpc``). It is
    reachable from the container (pod) alone, and every other service, reflection
    included, is UNIMPLEMENTED there. ``servicer`` is the main server's, so it answers
    what Envoy's checks see (NOT_SERVING once a stop begins); and this server's handlers
    run on the service's own event loop, so a loop that hangs fails the probe by its
    timeout, where a TLS handshake (made by gRPC's own threads) would still pass."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if server.add_insecure_port(f"{LOOPBACK}:{port}") == 0:
        raise OSError(f"cannot listen on {LOOPBACK}:{port} for health probes (port in use?)")
    await server.start()
    return server


async def serve(*, name: str, address: str, register: Callable[[grpc.aio.Server], None],
                service_names: Iterable[str], grace_s: float,
                on_stop: Callable[[], Awaitable[None]] | None = None,
                interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                tls: MeshTls | None = None, health_port: int = 0) -> None:
    """Run a grpc.aio server until SIGTERM/SIGINT, then stop accepting calls, give
    in-flight ones ``grace_s`` seconds to finish, and return. ``interceptors``: the
    tracing ones of ``telemetry.Telemetry``, when tracing is on. ``tls``: serve mutual
    TLS that only Envoy's certificate passes (``tls.py``); None: plaintext.
    ``health_port``: also answer the health service alone, in plaintext, on
    127.0.0.1:``health_port`` (``serve_health_port``); 0: not."""
    log = logging.getLogger(name)
    server = new_server(interceptors)
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    port = (server.add_insecure_port(address) if tls is None
            else server.add_secure_port(address, tls.server_credentials()))
    if port == 0:
        raise OSError(f"{name}: cannot listen on {address} (port in use?)")
    # Before anything answers SERVING: a stop signal from then on is a graceful stop.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    probes = None if health_port == 0 else await serve_health_port(health_servicer,
                                                                   port=health_port)
    await server.start()
    for service in [*service_names, ""]:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving", extra={"address": address, "port": port, "tls": tls is not None,
                               "health_port": health_port})

    await stop.wait()
    t0 = time.monotonic()
    log.info("stopping", extra={"grace_s": grace_s})
    await health_servicer.enter_graceful_shutdown()  # the probes see NOT_SERVING
    await server.stop(grace_s)
    if on_stop is not None:
        await on_stop()
    if probes is not None:
        await probes.stop(None)
    log.info("stopped", extra={"seconds": round(time.monotonic() - t0, 3)})
