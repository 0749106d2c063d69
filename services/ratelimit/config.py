"""The rate-limit service's configuration, read once at the entry point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from genmesh.core.config import ServerConfig


@dataclass(frozen=True, slots=True)
class RatelimitConfig(ServerConfig):
    SERVICE: ClassVar[str] = "ratelimit"
    DESCRIPTION: ClassVar[str] = "global rate limits for Envoy (RLS v3) over Redis"

    port: int = 50071
    # Where the counters live; every replica of this service must use the same Redis.
    redis_url: str = "redis://127.0.0.1:6390/0"
    # The limits file (YAML, see services/ratelimit/limits.py); required. Replace it by
    # an atomic rename to change limits: it is re-read within a second.
    limits_file: str = ""
    # Longest a request may wait for Redis (connect and answer together) before the
    # call fails with UNAVAILABLE.
    redis_timeout_s: float = 0.25
