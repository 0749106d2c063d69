"""The seed-fastapi baseline app, in-process over httpx's ASGI transport, on a fake
model: one character per token, each next token the previous one plus one."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import torch

from genmesh.bench.seed_fastapi import IncrementalText, create_app

EOS = ord("$")


class CharTokenizer:
    eos_token_id = EOS

    def apply_chat_template(self, messages: list[dict[str, str]], *,
                            add_generation_prompt: bool, tokenize: bool) -> str:
        assert add_generation_prompt and not tokenize
        return "".join(f"{m['role']}:{m['content']}\n" for m in messages) + "assistant:"

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], *, skip_special_tokens: bool) -> str:
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == EOS))


class CountingModel:
    """``generate`` as HF's is called: greedy, min/max new tokens, an optional streamer
    that gets the prompt first, then each token."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def generate(self, ids: torch.Tensor, *, attention_mask: torch.Tensor, do_sample: bool,
                 max_new_tokens: int, min_new_tokens: int, pad_token_id: int,
                 streamer: Any = None) -> torch.Tensor:
        self.calls.append({"prompt": ids[0].tolist(), "do_sample": do_sample,
                           "min_new_tokens": min_new_tokens})
        assert attention_mask.shape == ids.shape
        if streamer is not None:
            streamer.put(ids)
        out = ids[0].tolist()
        for _ in range(max_new_tokens):
            token = out[-1] + 1
            if token == EOS and len(out) - ids.shape[1] < min_new_tokens:
                token += 1  # what min_new_tokens does: EOS is masked
            out.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if token == EOS:
                break
        if streamer is not None:
            streamer.end()
        return torch.tensor([out])


def post(app: Any, path: str, body: dict[str, Any]) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://seed") as client:
            response = await client.post(path, json=body)
            await response.aread()
            return response

    return asyncio.run(go())


def test_generate_returns_the_whole_answer_greedy():
    model = CountingModel()
    app = create_app(model, CharTokenizer())
    # The prompt ends with ":" (58); the next tokens are ";<=>"...
    reply = post(app, "/generate", {"prompt": "hi:", "max_tokens": 4})
    assert reply.status_code == 200
    assert reply.json() == {"text": ";<=>", "finish_reason": "length", "prompt_tokens": 3,
                            "completion_tokens": 4}
    assert model.calls == [{"prompt": [104, 105, 58], "do_sample": False, "min_new_tokens": 0}]


def test_generate_stops_at_eos_unless_told_to_ignore_it():
    app = create_app(CountingModel(), CharTokenizer())
    # "!" (33) counts up to "$" (36, EOS) after three tokens.
    stopped = post(app, "/generate", {"prompt": " !", "max_tokens": 8}).json()
    assert stopped == {"text": '"#', "finish_reason": "stop", "prompt_tokens": 2,
                       "completion_tokens": 3}
    ignored = post(app, "/generate", {"prompt": " !", "max_tokens": 4, "ignore_eos": True})
    assert ignored.json() == {"text": '"#%&', "finish_reason": "length", "prompt_tokens": 2,
                              "completion_tokens": 4}


def test_generate_stream_sends_one_line_per_token_then_the_counts():
    model = CountingModel()
    app = create_app(model, CharTokenizer())
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
            "ignore_eos": True}
    reply = post(app, "/generate_stream", body)
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in reply.text.splitlines()]
    # "user:x\nassistant:" ends with ":" (58): ";", "<", "=" follow.
    assert lines == [{"text": ";"}, {"text": "<"}, {"text": "="},
                     {"finish_reason": "length", "prompt_tokens": 17, "completion_tokens": 3}]
    assert model.calls[0]["min_new_tokens"] == 3


def test_bad_requests_are_refused_before_any_generate():
    model = CountingModel()
    app = create_app(model, CharTokenizer())
    assert post(app, "/generate", {"max_tokens": 3}).status_code == 422
    assert post(app, "/generate_stream", {"prompt": "a", "max_tokens": 0}).status_code == 422
    assert model.calls == []


def test_a_failing_generate_ends_the_stream_with_an_error_line():
    class Broken(CountingModel):
        def generate(self, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            raise RuntimeError("out of memory")

    reply = post(create_app(Broken(), CharTokenizer()), "/generate_stream",
                 {"prompt": "a", "max_tokens": 2})
    assert [json.loads(line) for line in reply.text.splitlines()] == [
        {"error": "RuntimeError: out of memory"}]


def test_incremental_text_waits_for_a_whole_character():
    class Utf8:
        def decode(self, ids: list[int], *, skip_special_tokens: bool) -> str:
            return bytes(ids).decode("utf-8", errors="replace")

    text = IncrementalText(Utf8())
    assert [text.push(b) for b in "aé!".encode()] == ["a", "", "é", "!"]
