"""Entry point: ``python -m services.ratelimit.main --limits-file PATH [--flags]`` (or
GENMESH_RATELIMIT_* env)."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from genmesh.rls.v3 import rls_pb2, rls_pb2_grpc
from services.common.server import run_service, serve
from services.common.telemetry import settings_from, setup
from services.common.tls import MeshTls, redis_url
from services.ratelimit.config import RatelimitConfig
from services.ratelimit.counters import CountersUnavailableError, RedisCounters
from services.ratelimit.limiter import RateLimiter
from services.ratelimit.limits import LimitsFile
from services.ratelimit.servicer import RateLimitServicer

log = logging.getLogger("genmesh.ratelimit")
SERVICE_NAME = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name


async def run(cfg: RatelimitConfig) -> None:
    telemetry = setup(settings_from("genmesh-ratelimit", cfg))
    if not cfg.limits_file:
        raise ValueError("no limits file: set --limits-file (or GENMESH_RATELIMIT_LIMITS_FILE)")
    limits = LimitsFile(Path(cfg.limits_file))
    current = limits.current()
    log.info("limits loaded", extra={"path": cfg.limits_file, "domain": current.domain,
                                     "num_limits": current.num_limits})
    counters = RedisCounters.from_url(redis_url(cfg, cfg.redis_url), timeout_s=cfg.redis_timeout_s)
    # Serve even without Redis (logged): calls answer UNAVAILABLE until it is up.
    with contextlib.suppress(CountersUnavailableError):
        await counters.ping()
    servicer = RateLimitServicer(RateLimiter(limits=limits, counters=counters))
    await serve(tls=MeshTls.of(cfg), health_port=cfg.health_port,
                name="genmesh.ratelimit", address=cfg.address,
                register=lambda s: rls_pb2_grpc.add_RateLimitServiceServicer_to_server(
                    servicer, s),
                service_names=[SERVICE_NAME], grace_s=cfg.shutdown_grace_s,
                on_stop=telemetry.flush_after(counters.close),
                interceptors=telemetry.server_interceptors())


def main(argv: list[str] | None = None) -> int:
    return run_service(RatelimitConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
