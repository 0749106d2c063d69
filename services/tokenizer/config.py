"""The tokenizer's configuration, read once at the entry point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from genmesh.core.config import ServerConfig


@dataclass(frozen=True, slots=True)
class TokenizerConfig(ServerConfig):
    SERVICE: ClassVar[str] = "tokenizer"
    DESCRIPTION: ClassVar[str] = "the tokenizer service"

    port: int = 50052
    models: str = "smollm2-135m-instruct"  # comma-separated store names (or HF folders)

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.models.split(",") if name.strip())
