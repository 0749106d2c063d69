"""The frontend's configuration, read once at the entry point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from genmesh.core.config import ServerConfig
from services.frontend.detokenize import DetokenizeMode
from services.frontend.moderation import ModerationMode


@dataclass(frozen=True, slots=True)
class FrontendConfig(ServerConfig):
    SERVICE: ClassVar[str] = "frontend"
    DESCRIPTION: ClassVar[str] = "the public API and its pipeline"

    port: int = 50051
    shutdown_grace_s: float = 10.0  # how long in-flight streams may finish on SIGTERM
    # Where the internal services are reached: Envoy's mesh listener by default, which
    # routes by gRPC service name (a service's own address works too).
    tokenizer_address: str = "127.0.0.1:8081"
    worker_address: str = "127.0.0.1:8081"
    # Used when the deployment names a safety service (its failure modes and timeout are
    # in the deployment's limits).
    safety_address: str = "127.0.0.1:8081"
    # Used when the deployment names a cache service (the response cache).
    cache_address: str = "127.0.0.1:8081"
    # The deployment description (genmesh/core/deployment.py): model and versions, tenants and
    # their token budgets, Redis. Empty: the two fields below, no tenants, no budgets.
    deployment_file: str = ""
    model: str = "smollm2-135m-instruct"  # the model served (and the default)
    model_versions: str = "v1"  # comma-separated versions of the model; the first is default
    # Where generated token ids become text: in-process from the model store's
    # tokenizer.json (the tokenizer service's file), or the tokenizer service's Detokenize
    # stream; auto: in-process when the store has the model. Chosen once at start.
    detokenize: DetokenizeMode = DetokenizeMode.AUTO
    model_store: str = ""  # the model store's root; "": $GENMESH_MODEL_STORE or the default
    # How generated text goes through the safety service's Moderate stream (with a safety
    # service in the deployment), GENMESH_FRONTEND_MODERATION: adaptive (a piece goes at
    # once while fewer than moderation_max_in_flight messages await their verdicts; what
    # comes meanwhile goes as one message when a verdict returns), pipelined (every piece
    # at once), window (gathered for up to window_ms or window_chars), or lockstep (a
    # round trip per piece).
    moderation: ModerationMode = ModerationMode.ADAPTIVE
    moderation_max_in_flight: int = 1
    moderation_window_ms: float = 20.0
    moderation_window_chars: int = 64
    redis_timeout_s: float = 0.25  # longest wait for Redis when reserving a token budget
    rpc_timeout_s: float = 10.0  # deadline of each unary call to an internal service
    max_generation_s: float = 600.0  # longest a generation may stream (client deadlines win)
    max_session_turns: int = 256  # turns one Chat session may run

    def __post_init__(self) -> None:
        if self.moderation_max_in_flight < 1:
            raise ValueError("moderation_max_in_flight must be >= 1, got "
                             f"{self.moderation_max_in_flight}")
        if self.moderation_window_ms <= 0 or self.moderation_window_chars < 1:
            raise ValueError("moderation_window_ms must be > 0 and moderation_window_chars "
                             ">= 1")

    @property
    def versions(self) -> tuple[str, ...]:
        return tuple(v.strip() for v in self.model_versions.split(",") if v.strip())
