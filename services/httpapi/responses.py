"""OpenAI response objects from the frontend's replies: ``chat.completion`` and
``text_completion`` for whole answers, ``chat.completion.chunk`` (and streamed
``text_completion``) for Server-Sent Events, and the ``usage`` of both."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from genmesh.v1 import common_pb2, generation_pb2

FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
    # A generation the server cut short (a client cancel never gets an answer).
    common_pb2.FINISH_REASON_ABORT: "stop",
}


@dataclass(frozen=True, slots=True)
class Envelope:
    """What every object of one response shares."""

    id: str  # "chatcmpl-…" or "cmpl-…"
    created: int  # unix seconds
    model: str  # the model that answered
    is_chat: bool

    @property
    def object(self) -> str:
        return "chat.completion" if self.is_chat else "text_completion"

    def head(self, *, chunk: bool = False) -> dict[str, Any]:
        kind = "chat.completion.chunk" if chunk and self.is_chat else self.object
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None}


def usage(usages: list[common_pb2.Usage]) -> dict[str, Any]:
    """The usage of all of a request's choices: the prompt counted once (the choices
    share it), the completions summed."""
    prompt = max((u.prompt_tokens for u in usages), default=0)
    cached = max((u.cached_prompt_tokens for u in usages), default=0)
    completion = sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def finish_reason(reason: int) -> str | None:
    return FINISH_REASONS.get(reason)  # type: ignore[call-overload]


@dataclass(frozen=True, slots=True)
class ChoiceOut:
    """One choice of a whole answer."""

    index: int
    text: str
    reason: int  # the frontend's FinishReason
    logprobs: Sequence[generation_pb2.OutputLogprob] = ()
    calls: Sequence[common_pb2.ToolCall] = ()  # the frontend parsed them out of the text


def whole(env: Envelope, choices: Sequence[ChoiceOut], usages: list[common_pb2.Usage],
          *, with_logprobs: bool) -> dict[str, Any]:
    """A whole (non-streamed) answer."""
    out = []
    for c in choices:
        lp = logprobs(env, c.logprobs) if with_logprobs else None
        if env.is_chat:
            message: dict[str, Any] = {"role": "assistant",
                                       "content": (c.text or None) if c.calls else c.text,
                                       "refusal": None}
            if c.calls:
                message["tool_calls"] = [tool_call(call) for call in c.calls]
            out.append({"index": c.index, "message": message, "logprobs": lp,
                        "finish_reason": "tool_calls" if c.calls else finish_reason(c.reason)})
        else:
            out.append({"index": c.index, "text": c.text, "logprobs": lp,
                        "finish_reason": finish_reason(c.reason)})
    return env.head() | {"choices": out, "usage": usage(usages)}


def tool_call(call: common_pb2.ToolCall, *, index: int | None = None) -> dict[str, Any]:
    """A call as OpenAI's ``tool_calls`` list it (a streamed delta's with its index)."""
    out: dict[str, Any] = {"id": call.id, "type": "function",
                           "function": {"name": call.name, "arguments": call.arguments}}
    return out if index is None else {"index": index} | out


def logprobs(env: Envelope, tokens: Sequence[generation_pb2.OutputLogprob]
             ) -> dict[str, Any]:
    """Tokens' logprobs in the endpoint's shape: chat's ``{"content": [...]}`` or the
    completions API's parallel lists."""
    if env.is_chat:
        return {"content": [{"token": t.token, "logprob": t.logprob,
                             "bytes": list(t.token_bytes),
                             "top_logprobs": [{"token": a.token, "logprob": a.logprob,
                                               "bytes": list(a.token_bytes)}
                                              for a in t.top_logprobs]} for t in tokens],
                "refusal": None}
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t.token)
    return {"tokens": [t.token for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{a.token: a.logprob for a in t.top_logprobs} for t in tokens],
            "text_offset": offsets}


def chunk(env: Envelope, index: int, *, text: str | None = None, role: bool = False,
          finish: str | None = None, calls: Sequence[common_pb2.ToolCall] = (),
          tokens: Sequence[generation_pb2.OutputLogprob] | None = None) -> dict[str, Any]:
    """One streamed event of choice ``index``: new text (with its tokens' logprobs when
    asked for), the opening role (chat), tool calls (chat), or the finish reason
    (``finish_reason``'s text)."""
    choice: dict[str, Any]
    if env.is_chat:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = [tool_call(c, index=j) for j, c in enumerate(calls)]
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
    if tokens is not None:
        choice["logprobs"] = logprobs(env, tokens)
    return env.head(chunk=True) | {"choices": [choice]}


def usage_chunk(env: Envelope, usages: list[common_pb2.Usage]) -> dict[str, Any]:
    """The stream's last event when ``stream_options.include_usage`` is set."""
    return env.head(chunk=True) | {"choices": [], "usage": usage(usages)}


def sse(obj: dict[str, Any]) -> bytes:
    """One Server-Sent Event carrying ``obj`` as JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
