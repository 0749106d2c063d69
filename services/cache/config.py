"""The cache service's configuration, read once at the entry point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from genmesh.core.config import ServerConfig


@dataclass(frozen=True, slots=True)
class CacheConfig(ServerConfig):
    SERVICE: ClassVar[str] = "cache"
    DESCRIPTION: ClassVar[str] = "the response cache"

    port: int = 50054
    # The store: Redis when a URL is given (shared by every cache replica), else bounded
    # memory in this process (the same behaviour, for a stack with nothing installed).
    redis_url: str = ""
    redis_timeout_s: float = 0.25  # longest wait for Redis per command; then UNAVAILABLE
    max_memory_mb: int = 256  # answers kept, in MiB of their bytes; LRU past it
    max_entry_kb: int = 4096  # a larger answer is not stored
    default_ttl_s: int = 3600  # how long an answer is kept when Store names no TTL
    default_lease_ms: int = 30_000  # how long a single-flight lease lasts by default
