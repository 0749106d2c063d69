"""Entry point: ``python -m services.cache.main [--flags]`` (or GENMESH_CACHE_* env)."""

from __future__ import annotations

import asyncio
import logging
import sys

from genmesh.v1 import cache_pb2, cache_pb2_grpc
from services.cache.config import CacheConfig
from services.cache.memory_store import MemoryStore
from services.cache.redis_store import redis_store
from services.cache.servicer import CacheServicer
from services.cache.store import AnswerStore, StoreLimits
from services.common.server import run_service, serve
from services.common.telemetry import settings_from, setup
from services.common.tls import MeshTls, redis_url

log = logging.getLogger("genmesh.cache")


def answer_store(cfg: CacheConfig) -> AnswerStore:
    max_bytes = cfg.max_memory_mb * 2**20
    limits = StoreLimits(max_bytes=max_bytes,
                         max_entry_bytes=min(cfg.max_entry_kb * 2**10, max_bytes),
                         default_ttl_s=cfg.default_ttl_s, default_lease_ms=cfg.default_lease_ms)
    if cfg.redis_url:
        return redis_store(redis_url(cfg, cfg.redis_url), limits, timeout_s=cfg.redis_timeout_s)
    return MemoryStore(limits)


async def run(cfg: CacheConfig) -> None:
    telemetry = setup(settings_from("genmesh-cache", cfg))
    store = answer_store(cfg)
    servicer = CacheServicer(store)
    publishing = asyncio.ensure_future(servicer.publish_metrics())
    log.info("cache store ready", extra={"store": store.name, "max_memory_mb": cfg.max_memory_mb,
                                         "default_ttl_s": cfg.default_ttl_s})
    async def stop() -> None:
        publishing.cancel()
        await store.close()

    await serve(tls=MeshTls.of(cfg), health_port=cfg.health_port,
                name="genmesh.cache", address=cfg.address,
                register=lambda s: cache_pb2_grpc.add_CacheServicer_to_server(servicer, s),
                service_names=[cache_pb2.DESCRIPTOR.services_by_name["Cache"].full_name],
                grace_s=cfg.shutdown_grace_s, on_stop=telemetry.flush_after(stop),
                interceptors=telemetry.server_interceptors())


def main(argv: list[str] | None = None) -> int:
    return run_service(CacheConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
