"""The HTTP API's configuration, read once at the entry point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from genmesh.core.config import ServerConfig


@dataclass(frozen=True, slots=True)
class HttpApiConfig(ServerConfig):
    SERVICE: ClassVar[str] = "httpapi"
    DESCRIPTION: ClassVar[str] = "the OpenAI-compatible HTTP API (behind Envoy's edge)"

    port: int = 50055
    shutdown_grace_s: float = 10.0  # how long in-flight streams may finish on SIGTERM
    # The frontend's own gRPC address (not Envoy's edge: the edge has already checked the
    # key and stamped the tenant on the request this service forwards).
    frontend_address: str = "127.0.0.1:50051"
    # Longest a request may run when the client sets no timeout of its own.
    max_request_s: float = 600.0
    # Largest request body accepted (Envoy's edge enforces the deployment's limit first).
    max_body_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_request_s <= 0:
            raise ValueError(f"max_request_s must be > 0, got {self.max_request_s}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
