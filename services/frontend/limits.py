"""The size limits of one request, decided before any downstream call.

A request over a limit is refused at once with INVALID_ARGUMENT naming the limit and the
request's own figure, so the caller knows what to change (retrying cannot help). Without
them a chat of thousands of messages costs a prompt check per message and a template
render over all of them, and ends in a deadline that reads like an outage. The tokens of
a prompt against the model's context are decided later, by the worker, once they are
known: these limits only keep the work before that bounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from services.frontend.errors import PipelineError

if TYPE_CHECKING:
    from services.frontend.pipeline import PipelineRequest


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The deployment's ``limits.max_chat_messages`` and ``limits.max_prompt_chars``."""

    # Messages of one chat, system prompt and history included (a Chat session's turn
    # sends the whole conversation). The default admits a session's 256 turns with a
    # system prompt: 1 + 2 * 255 + 1 = 512.
    max_chat_messages: int = 512
    # Characters (code points) of a prompt, or of all a chat's messages together.
    max_prompt_chars: int = 256 * 1024

    def check(self, req: PipelineRequest) -> None:
        """Raises PipelineError (INVALID_ARGUMENT) when ``req`` is over a limit."""
        if req.prompt is not None:
            num_chars, what = len(req.prompt), "this prompt has"
        else:
            if len(req.messages) > self.max_chat_messages:
                raise PipelineError(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"this chat has {len(req.messages)} messages; the limit "
                                    f"is {self.max_chat_messages} (limits.max_chat_messages)")
            num_chars = sum(len(m.content) for m in req.messages)
            what = "this chat's messages have"
        if num_chars > self.max_prompt_chars:
            raise PipelineError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{what} {num_chars} characters; the limit is "
                                f"{self.max_prompt_chars} (limits.max_prompt_chars)")


DEFAULT_LIMITS = RequestLimits()
