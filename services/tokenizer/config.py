"""The tokenizer's configuration, read once at the entry point."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.config import parse_config


@dataclass(frozen=True, slots=True)
class TokenizerConfig:
    host: str = "127.0.0.1"
    port: int = 50052
    models: str = "smollm2-135m-instruct"  # comma-separated store names (or HF folders)
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

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.models.split(",") if name.strip())


ENV_PREFIX = "GENMESH_TOKENIZER_"


def load_config(argv: list[str] | None, environ: Mapping[str, str]) -> TokenizerConfig:
    """Defaults, overridden by ``GENMESH_TOKENIZER_<FIELD>`` variables, then by flags."""
    return parse_config(TokenizerConfig, env_prefix=ENV_PREFIX, prog="genmesh-tokenizer",
                        description="the tokenizer service", argv=argv, environ=environ)
