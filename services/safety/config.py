"""The safety service's configuration, read once at the entry point."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.common.config import parse_config

DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "deploy" / "safety" / "policy.yaml"


@dataclass(frozen=True, slots=True)
class SafetyConfig:
    host: str = "127.0.0.1"
    port: int = 50053
    policy_file: str = str(DEFAULT_POLICY)  # per-tenant policy (YAML)
    # The learned prompt-injection signal (all-MiniLM-L6-v2, ~90 MB, ~3 s to load).
    # Off: rules only, for tenants whose policy names the embedding scanner too.
    embedding: bool = True
    num_threads: int = 2  # CPU threads for the embedding model
    # Where audit records go: a Redis URL (a capped stream), else a JSONL file, else none.
    audit_redis_url: str = ""
    audit_file: str = ""
    max_text_chars: int = 100_000  # longest prompt or stream accepted (INVALID_ARGUMENT)
    # Longest text a stream holds back while a match might still complete (characters).
    max_hold_chars: int = 256
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


ENV_PREFIX = "GENMESH_SAFETY_"


def load_config(argv: list[str] | None, environ: Mapping[str, str]) -> SafetyConfig:
    """Defaults, overridden by ``GENMESH_SAFETY_<FIELD>`` variables, then by flags."""
    return parse_config(SafetyConfig, env_prefix=ENV_PREFIX, prog="genmesh-safety",
                        description="the safety service", argv=argv, environ=environ)
