"""What a pipeline run streams to its caller: Started, then TextChunks, then Finished."""

from __future__ import annotations

from dataclasses import dataclass, field

from genmesh.core.models.chat_template import ChatMessage
from genmesh.v1 import common_pb2, generation_pb2


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
class ChunkLogprob:
    """A generated token's logprobs, riding with the TextChunk that has the last
    character of its text (``services/frontend/logprobs.py``)."""

    end: int  # where the token's text ends in the chunk's text, 1..len(text)
    logprob: generation_pb2.OutputLogprob  # as the client gets it


@dataclass(frozen=True, slots=True)
class TextChunk:
    text: str  # new final text; never empty
    # The generation's last text: a Finished comes next. Set inside the chain, by the
    # stages before moderation, so that moderation sends it with the flush.
    is_final: bool = False
    # With logprobs asked: the tokens whose text ends in ``text``, in order.
    logprobs: tuple[ChunkLogprob, ...] = ()
    index: int = 0  # the choice it belongs to (PipelineRequest.n)


@dataclass(frozen=True, slots=True)
class Finished:
    finish_reason: common_pb2.FinishReason
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)
    detail: str = ""  # with CONTENT_FILTER: the category that cut the output
    index: int = 0  # the choice it finishes; with n > 1 one Finished comes per choice
    # With tools: the calls the model made in this choice (``tools.with_tool_calls``).
    tool_calls: tuple[common_pb2.ToolCall, ...] = ()


Event = Started | TextChunk | Finished
