"""The tokenizer's configuration, read once at the entry point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from genmesh.core.config import ServerConfig

# The default bounds of one call: 1 Mi characters take ~0.5 s to tokenize. Four and eight
# times the deployment's default limits.max_prompt_chars and max_chat_messages, which
# the frontend enforces first.
MAX_TEXT_CHARS = 1024 * 1024
MAX_CHAT_MESSAGES = 4096


@dataclass(frozen=True, slots=True)
class TokenizerConfig(ServerConfig):
    SERVICE: ClassVar[str] = "tokenizer"
    DESCRIPTION: ClassVar[str] = "the tokenizer service"

    port: int = 50052
    models: str = "smollm2-135m-instruct"  # comma-separated store names (or HF folders)
    # The most one call may ask for (INVALID_ARGUMENT beyond), so that no caller makes the
    # service tokenize without bound: characters of a Tokenize text or of a chat's
    # messages together, and messages of a chat.
    max_text_chars: int = MAX_TEXT_CHARS
    max_chat_messages: int = MAX_CHAT_MESSAGES

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.models.split(",") if name.strip())
