"""The rate-limit service's configuration, read once at the entry point."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.config import parse_config


@dataclass(frozen=True, slots=True)
class RatelimitConfig:
    host: str = "127.0.0.1"
    port: int = 50071
    # Where the counters live; every replica of this service must use the same Redis.
    redis_url: str = "redis://127.0.0.1:6390/0"
    # The limits file (YAML, see services/ratelimit/limits.py); required. Replace it by
    # an atomic rename to change limits: it is re-read within a second.
    limits_file: str = ""
    # Longest a request may wait for Redis (connect and answer together) before the
    # call fails with UNAVAILABLE.
    redis_timeout_s: float = 0.25
    shutdown_grace_s: float = 5.0  # how long in-flight calls may finish on SIGTERM
    # Telemetry: spans to this OTLP/gRPC collector (host:port; "": none), a share of new
    # traces kept, and the Prometheus endpoint's port (0: none).
    otlp_endpoint: str = ""
    trace_sample_ratio: float = 1.0
    metrics_port: int = 0
    log_level: str = "INFO"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


ENV_PREFIX = "GENMESH_RATELIMIT_"


def load_config(argv: list[str] | None, environ: Mapping[str, str]) -> RatelimitConfig:
    """Defaults, overridden by ``GENMESH_RATELIMIT_<FIELD>`` variables, then by flags."""
    return parse_config(RatelimitConfig, env_prefix=ENV_PREFIX, prog="genmesh-ratelimit",
                        description="global rate limits for Envoy (RLS v3) over Redis",
                        argv=argv, environ=environ)
