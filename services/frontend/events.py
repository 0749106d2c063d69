"""What a pipeline run streams to its caller: Started, then TextChunks, then Finished."""

from __future__ import annotations

from dataclasses import dataclass, field

from genmesh.core.models.chat_template import ChatMessage
from genmesh.v1 import common_pb2


@dataclass(frozen=True, slots=True)
class Started:
    request_id: str
    model: str
    model_version: str  # the version that serves the request
    prompt_tokens: int
    # The conversation as the model saw it (with the safety policy's redactions); empty
    # for a raw prompt.
    messages: tuple[ChatMessage, ...] = ()


@dataclass(frozen=True, slots=True)
class TextChunk:
    text: str  # new final text; never empty
    # The generation's last text: a Finished comes next. Set inside the chain, by the
    # stages before moderation, so that moderation sends it with the flush.
    is_final: bool = False


@dataclass(frozen=True, slots=True)
class Finished:
    finish_reason: common_pb2.FinishReason
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)
    detail: str = ""  # with CONTENT_FILTER: the category that cut the output


Event = Started | TextChunk | Finished
