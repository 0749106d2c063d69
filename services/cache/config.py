"""The cache service's configuration, read once at the entry point."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.config import parse_config


@dataclass(frozen=True, slots=True)
class CacheConfig:
    host: str = "127.0.0.1"
    port: int = 50054
    # The store: Redis when a URL is given (shared by every cache replica), else bounded
    # memory in this process (the same behaviour, for a stack with nothing installed).
    redis_url: str = ""
    redis_timeout_s: float = 0.25  # longest wait for Redis per command; then UNAVAILABLE
    max_memory_mb: int = 256  # answers kept, in MiB of their bytes; LRU past it
    max_entry_kb: int = 4096  # a larger answer is not stored
    default_ttl_s: int = 3600  # how long an answer is kept when Store names no TTL
    default_lease_ms: int = 30_000  # how long a single-flight lease lasts by default
    shutdown_grace_s: float = 5.0
    # Telemetry: spans to this OTLP/gRPC collector (host:port; "": none), a share of new
    # traces kept, and the Prometheus endpoint's port (0: none).
    otlp_endpoint: str = ""
    trace_sample_ratio: float = 1.0
    metrics_port: int = 0
    log_level: str = "INFO"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


ENV_PREFIX = "GENMESH_CACHE_"


def load_config(argv: list[str] | None, environ: Mapping[str, str]) -> CacheConfig:
    """Defaults, overridden by ``GENMESH_CACHE_<FIELD>`` variables, then by flags."""
    return parse_config(CacheConfig, env_prefix=ENV_PREFIX, prog="genmesh-cache",
                        description="the response cache", argv=argv, environ=environ)
