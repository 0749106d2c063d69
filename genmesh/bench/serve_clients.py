"""The two kinds of server `genmesh bench serve` loads, behind one small interface.

A backend runs a whole conversation (its turns in order) and reports one RequestRecord
per turn as the turn ends; a failed turn is reported and ends the conversation (the
driver accounts for the turns never sent).

- ``MeshBackend``: the mesh's public gRPC API through the SDK. A one-turn conversation is
  a streaming Generate (``skip_cache``: the response cache must not answer a benchmark);
  a multi-turn one is a bidi Chat session, whose history lives in the frontend.
- ``OpenAIBackend``: the mesh's OpenAI-compatible HTTP API through the same edge, one
  streamed ``/v1/chat/completions`` per turn (Server-Sent Events, usage in the last
  event), carrying the whole history as the client keeps it.
- ``SeedBackend``: the seed-fastapi baseline over HTTP, one streamed POST per turn,
  carrying the whole history as the client keeps it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Protocol

import httpx

from genmesh.bench.serve_metrics import RequestRecord, RequestStatus
from genmesh.bench.serve_workload import Conversation, turn_messages
from genmesh.client import AsyncChatSession, AsyncClient
from genmesh.client.types import GenmeshError, TextDelta, TurnFinished

OnRecord = Callable[[RequestRecord], None]
_COMPLETE = ("stop", "length")  # finish reasons of an answer that arrived whole


class Backend(Protocol):
    async def converse(self, conversation: Conversation, on_record: OnRecord) -> None: ...


def _failed(start_s: float, chunk_times: list[float], error: str) -> RequestRecord:
    return RequestRecord(start_s, tuple(chunk_times), time.perf_counter(), 0, 0,
                         RequestStatus.FAILED, error)


def _finished(start_s: float, chunk_times: list[float], *, finish_reason: str | None,
              prompt_tokens: int, output_tokens: int) -> RequestRecord:
    status = RequestStatus.OK if finish_reason in _COMPLETE else RequestStatus.FAILED
    error = "" if status is RequestStatus.OK else f"finished with {finish_reason}"
    return RequestRecord(start_s, tuple(chunk_times), time.perf_counter(), prompt_tokens,
                         output_tokens, status, error)


class MeshBackend:
    def __init__(self, client: AsyncClient, *, max_tokens: int) -> None:
        self.client = client
        self.max_tokens = max_tokens  # every request: greedy (the default), EOS ignored

    async def converse(self, conversation: Conversation, on_record: OnRecord) -> None:
        if len(conversation.user_turns) == 1:
            await self._generate(conversation, on_record)
        else:
            await self._chat(conversation, on_record)

    async def _generate(self, conversation: Conversation, on_record: OnRecord) -> None:
        chunk_times: list[float] = []
        start = time.perf_counter()
        try:
            async for chunk in self.client.generate_stream(
                    messages=turn_messages(conversation, []), skip_cache=True,
                    max_tokens=self.max_tokens, ignore_eos=True):
                if chunk.text:
                    chunk_times.append(time.perf_counter())
                if chunk.finish_reason is not None:
                    usage = chunk.usage
                    on_record(_finished(
                        start, chunk_times, finish_reason=chunk.finish_reason,
                        prompt_tokens=usage.prompt_tokens if usage else 0,
                        output_tokens=usage.completion_tokens if usage else 0))
                    return
        except GenmeshError as exc:
            on_record(_failed(start, chunk_times, str(exc)))
            return
        on_record(_failed(start, chunk_times, "the stream ended without a finish reason"))

    async def _chat(self, conversation: Conversation, on_record: OnRecord) -> None:
        try:
            session = self.client.chat(system_prompt=conversation.system_prompt,
                                       max_tokens=self.max_tokens, ignore_eos=True)
            async with session:
                for user in conversation.user_turns:
                    if not await self._chat_turn(session, user, on_record):
                        return
        except GenmeshError as exc:  # opening or closing the session
            on_record(_failed(time.perf_counter(), [], str(exc)))

    @staticmethod
    async def _chat_turn(session: AsyncChatSession, user: str, on_record: OnRecord) -> bool:
        """One turn of an open session; whether it completed (else the session stops)."""
        chunk_times: list[float] = []
        start = time.perf_counter()
        try:
            async for event in session.turn(user):
                if isinstance(event, TextDelta) and event.text:
                    chunk_times.append(time.perf_counter())
                elif isinstance(event, TurnFinished):
                    record = _finished(start, chunk_times, finish_reason=event.finish_reason,
                                       prompt_tokens=event.usage.prompt_tokens,
                                       output_tokens=event.usage.completion_tokens)
                    on_record(record)
                    return record.is_ok
        except GenmeshError as exc:
            on_record(_failed(start, chunk_times, str(exc)))
            return False
        on_record(_failed(start, chunk_times, "the turn ended without TurnFinished"))
        return False


class _HistoryBackend:
    """A backend over HTTP whose server keeps no conversation: each turn is one request
    carrying the whole history, as the client keeps it."""

    async def converse(self, conversation: Conversation, on_record: OnRecord) -> None:
        replies: list[str] = []
        for _ in conversation.user_turns:
            record, reply = await self._turn(turn_messages(conversation, replies))
            on_record(record)
            if not record.is_ok:
                return
            replies.append(reply)

    async def _turn(self, messages: list[dict[str, str]]) -> tuple[RequestRecord, str]:
        raise NotImplementedError


class OpenAIBackend(_HistoryBackend):
    """Streamed chat completions over HTTP (``skip_cache`` is not an OpenAI field: each
    request's prompt is its own, so the response cache does not answer either)."""

    def __init__(self, http: httpx.AsyncClient, *, model: str, max_tokens: int) -> None:
        self.http = http  # base_url: the edge's /v1, with the tenant's Bearer key
        self.model = model
        self.max_tokens = max_tokens

    async def _turn(self, messages: list[dict[str, str]]) -> tuple[RequestRecord, str]:
        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        chunk_times: list[float] = []
        parts: list[str] = []
        finish: str | None = None
        start = time.perf_counter()
        try:
            async with self.http.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    return _failed(start, chunk_times,
                                   f"HTTP {response.status_code}: {response.text[:200]}"), ""
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        return _failed(start, chunk_times, str(event["error"])), ""
                    for choice in event.get("choices", ()):
                        if choice["delta"].get("content"):
                            chunk_times.append(time.perf_counter())
                            parts.append(choice["delta"]["content"])
                        finish = choice.get("finish_reason") or finish
                    usage = event.get("usage")
                    if usage:
                        return _finished(start, chunk_times, finish_reason=finish,
                                         prompt_tokens=usage["prompt_tokens"],
                                         output_tokens=usage["completion_tokens"]), "".join(
                                             parts)
        except httpx.HTTPError as exc:
            return _failed(start, chunk_times, f"{type(exc).__name__}: {exc}"), ""
        return _failed(start, chunk_times, "the stream ended without its usage"), ""


class SeedBackend(_HistoryBackend):
    """POST /generate_stream of the seed-fastapi app: newline-delimited JSON, one
    ``{"text": ...}`` line per generated token, then one line with the finish reason and
    the token counts."""

    def __init__(self, http: httpx.AsyncClient, *, max_tokens: int) -> None:
        self.http = http
        self.max_tokens = max_tokens

    async def _turn(self, messages: list[dict[str, str]]) -> tuple[RequestRecord, str]:
        body = {"messages": messages, "max_tokens": self.max_tokens, "ignore_eos": True}
        chunk_times: list[float] = []
        parts: list[str] = []
        start = time.perf_counter()
        try:
            async with self.http.stream("POST", "/generate_stream", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    return _failed(start, chunk_times,
                                   f"HTTP {response.status_code}: {response.text[:200]}"), ""
                async for line in response.aiter_lines():
                    if not line:
                        continue
                    item = json.loads(line)
                    if item.get("text"):
                        chunk_times.append(time.perf_counter())
                        parts.append(item["text"])
                    if "finish_reason" in item:
                        return _finished(start, chunk_times,
                                         finish_reason=item["finish_reason"],
                                         prompt_tokens=item["prompt_tokens"],
                                         output_tokens=item["completion_tokens"]), "".join(parts)
        except httpx.HTTPError as exc:
            return _failed(start, chunk_times, f"{type(exc).__name__}: {exc}"), ""
        return _failed(start, chunk_times, "the stream ended without a finish reason"), ""
