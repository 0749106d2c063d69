"""The HTTP API's app over a fake frontend (a real gRPC server in this process):
responses, streams and errors exactly as OpenAI's clients read them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import httpx
import pytest

from genmesh.core import metadata
from genmesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from services.frontend.errors import PipelineError
from services.frontend.tools import StreamedCalls, calls_in, tools_of
from services.httpapi.app import HttpApi


class FakeFrontend(generation_pb2_grpc.GenerationServicer):
    """Streams each request's words one message at a time; a prompt naming a status
    code fails with it. Tools are the real frontend's (``services/frontend/tools.py``):
    their fields are checked, and the calls parsed out of the words."""

    def __init__(self) -> None:
        self.seen: list[tuple[generation_pb2.GenerateRequest, dict[str, str]]] = []

    async def _fail_if_asked(self, request: generation_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> None:
        self.seen.append((request, dict(context.invocation_metadata() or ())))
        try:
            tools_of(request)
        except PipelineError as exc:
            await context.abort(exc.code, exc.message)
        text = request.prompt or request.chat.messages[-1].content
        if text.startswith("fail:"):
            code = grpc.StatusCode[text.split(":")[1]]
            await context.abort(code, f"asked to fail with {code.name}",
                                trailing_metadata=((metadata.RETRY_AFTER, "7"),
                                                   (metadata.RATE_LIMIT_LIMIT, "600"),
                                                   (metadata.RATE_LIMIT_REMAINING, "0"),
                                                   (metadata.RATE_LIMIT_RESET, "7")))

    def _words(self, request: generation_pb2.GenerateRequest, index: int = 0) -> list[str]:
        call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
        tools = tools_of(request)
        if tools is not None and tools.is_forced:  # the grammar makes it a call
            return [call[:10], call[10:30], call[30:]]
        if request.chat.messages and request.chat.messages[-1].content == "call":
            return ["Checking. <tool", "_call>\n" + call[:20], call[20:] + "\n</tool_call>"]
        return [f"w{request.params.seed + index}-{i} " for i in range(3)]

    @staticmethod
    def _logprobs(word: str) -> list[generation_pb2.OutputLogprob]:
        return [generation_pb2.OutputLogprob(
            token_id=7, token=word, token_bytes=word.encode(), logprob=-0.5,
            top_logprobs=[generation_pb2.OutputTopLogprob(token=word, logprob=-0.5,
                                                          token_bytes=word.encode())])]

    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> generation_pb2.GenerateResponse:
        await self._fail_if_asked(request, context)
        n = max(request.n, 1)
        text, calls = "".join(self._words(request)), list[common_pb2.ToolCall]()
        if (tools := tools_of(request)) is not None and tools.is_shown:
            text, calls = calls_in(text, tools)
        reply = generation_pb2.GenerateResponse(
            text=text, tool_calls=calls, finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=5, completion_tokens=3 * n,
                                   cached_prompt_tokens=2), model="m")
        if request.params.return_logprobs:
            reply.logprobs.extend(lp for w in self._words(request) for lp in self._logprobs(w))
        if n > 1:
            reply.choices.extend(generation_pb2.Choice(
                index=i, text="".join(self._words(request, i)),
                finish_reason=common_pb2.FINISH_REASON_LENGTH) for i in range(n))
        return reply

    async def GenerateStream(self, request: generation_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        await self._fail_if_asked(request, context)
        n = max(request.n, 1)
        words = [self._words(request, i) for i in range(n)]
        tools = tools_of(request)
        parsers = [StreamedCalls(tools) if tools is not None and tools.is_shown else None
                   for _ in range(n)]
        for step in range(3):  # the choices interleave
            for i, parser in enumerate(parsers):
                text = words[i][step] if parser is None else parser.feed(words[i][step])
                msg = generation_pb2.GenerateStreamResponse(text=text, index=i)
                if request.params.return_logprobs:
                    msg.logprobs.extend(self._logprobs(words[i][step]))
                yield msg
            await asyncio.sleep(0.001)
        for i, parser in enumerate(parsers):
            rest, calls = parser.finish() if parser is not None else ("", [])
            yield generation_pb2.GenerateStreamResponse(
                index=i, text=rest, tool_calls=calls, finish_reason=common_pb2.FINISH_REASON_STOP,
                usage=common_pb2.Usage(prompt_tokens=5, completion_tokens=3))

    async def ListModels(self, request: generation_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> generation_pb2.ListModelsResponse:
        return generation_pb2.ListModelsResponse(models=[generation_pb2.ModelInfo(
            name="m", versions=["v1"], is_default=True, max_model_len=2048)])


def run(frontend: FakeFrontend, requests: Any) -> Any:
    """``requests(client)`` against the app, over a fresh fake frontend server."""
    async def main() -> Any:
        server = grpc.aio.server()
        generation_pb2_grpc.add_GenerationServicer_to_server(frontend, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        api = HttpApi(generation_pb2_grpc.GenerationStub(channel), max_request_s=10,
                      max_body_bytes=4096)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api.app()),
                                         base_url="http://api") as client:
                return await requests(client)
        finally:
            await channel.close()
            await server.stop(0)
    return asyncio.run(main())


def events(body: str) -> Iterator[Any]:
    for line in body.split("\n\n"):
        if line:
            assert line.startswith("data: ")
            data = line.removeprefix("data: ")
            yield data if data == "[DONE]" else json.loads(data)


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_a_whole_chat_answer() -> None:
    frontend = FakeFrontend()
    r = run(frontend, lambda c: c.post("/v1/chat/completions", json=CHAT | {"seed": 1},
                                       headers={metadata.TENANT: "dev",
                                                metadata.REQUEST_ID: "r-1"}))
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {
        "role": "assistant", "content": "w1-0 w1-1 w1-2 ", "refusal": None},
        "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    _, md = frontend.seen[0]
    assert (md[metadata.TENANT], md[metadata.REQUEST_ID]) == ("dev", "r-1")


def test_a_streamed_chat_with_three_choices_and_usage() -> None:
    r = run(FakeFrontend(), lambda c: c.post("/v1/chat/completions", json=CHAT | {
        "n": 3, "seed": 4, "stream": True, "stream_options": {"include_usage": True}}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    evs = list(events(r.text))
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    texts: dict[int, str] = {0: "", 1: "", 2: ""}
    finishes = {}
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert [chunks[i]["choices"][0]["delta"] for i in range(3)] == [
        {"role": "assistant", "content": ""}] * 3
    assert texts == {i: f"w{4 + i}-0 w{4 + i}-1 w{4 + i}-2 " for i in range(3)}
    assert finishes == {0: "stop", 1: "stop", 2: "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 0}}


def test_a_streamed_completion() -> None:
    r = run(FakeFrontend(), lambda c: c.post("/v1/completions", json={
        "model": "m", "prompt": "x", "stream": True, "seed": 0}))
    evs = list(events(r.text))
    assert [e["choices"][0]["text"] for e in evs[:-1]] == ["w0-0 ", "w0-1 ", "w0-2 ", ""]
    assert all(e["choices"][0]["logprobs"] is None for e in evs[:-1])
    assert evs[-2]["choices"][0]["finish_reason"] == "stop"
    assert {e["object"] for e in evs[:-1]} == {"text_completion"}


@pytest.mark.parametrize(("code", "status", "kind", "headers"), [
    ("INVALID_ARGUMENT", 400, "invalid_request_error", {}),
    ("PERMISSION_DENIED", 400, "invalid_request_error", {}),
    ("UNAUTHENTICATED", 401, "invalid_request_error", {}),
    ("NOT_FOUND", 404, "invalid_request_error", {}),
    ("RESOURCE_EXHAUSTED", 429, "tokens", {"retry-after": "7", "x-ratelimit-limit": "600",
                                           "x-ratelimit-remaining": "0",
                                           "x-ratelimit-reset": "7"}),
    ("UNAVAILABLE", 503, "server_error", {"retry-after": "1"}),
    ("INTERNAL", 500, "server_error", {}),
])
@pytest.mark.parametrize("stream", [False, True])
def test_frontend_statuses_become_openai_errors(code: str, status: int, kind: str,
                                                headers: dict[str, str], stream: bool) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": f"fail:{code}"}],
            "stream": stream}
    r = run(FakeFrontend(), lambda c: c.post("/v1/chat/completions", json=body))
    assert r.status_code == status
    error = r.json()["error"]
    assert error["type"] == kind and set(error) == {"message", "type", "param", "code"}
    for name, value in headers.items():
        assert r.headers[name] == value


def test_http_errors_are_openai_shaped() -> None:
    async def calls(c: httpx.AsyncClient) -> list[httpx.Response]:
        return [await c.post("/v1/chat/completions", content=b"{nope"),
                await c.get("/v1/nothing"),
                await c.get("/v1/chat/completions"),
                await c.post("/v1/completions", content=b"x" * 5000),
                await c.post("/v1/chat/completions", json=CHAT | {"tools": [{}]})]
    replies = run(FakeFrontend(), calls)
    assert [r.status_code for r in replies] == [400, 404, 405, 413, 400]
    assert all(set(r.json()["error"]) == {"message", "type", "param", "code"} for r in replies)
    assert replies[4].json()["error"]["param"] == "tools[0]"


def test_models_and_health() -> None:
    async def calls(c: httpx.AsyncClient) -> list[httpx.Response]:
        return [await c.get("/v1/models"), await c.get("/v1/models/m"),
                await c.get("/v1/models/other"), await c.get("/healthz")]
    models, one, missing, health = run(FakeFrontend(), calls)
    assert models.json() == {"object": "list", "data": [
        {"id": "m", "object": "model", "created": 0, "owned_by": "genmesh",
         "max_model_len": 2048}]}
    assert one.json()["id"] == "m"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert health.status_code == 200


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}


@pytest.mark.parametrize(("content", "choice", "said"), [
    ("call", "auto", "Checking."), ("hi", "required", None)])
def test_tool_calls_whole(content: str, choice: str, said: str | None) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": content}],
            "tools": [WEATHER], "tool_choice": choice}
    r = run(FakeFrontend(), lambda c: c.post("/v1/chat/completions", json=body))
    (out,) = r.json()["choices"]
    assert out["finish_reason"] == "tool_calls" and out["message"]["content"] == said
    (call,) = out["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"] == CALL
    assert call["id"].startswith("call_")


@pytest.mark.parametrize(("content", "choice", "said"), [
    ("call", "auto", "Checking. "), ("hi", "required", "")])
def test_tool_calls_streamed(content: str, choice: str, said: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": content}],
            "tools": [WEATHER], "tool_choice": choice, "stream": True}
    r = run(FakeFrontend(), lambda c: c.post("/v1/chat/completions", json=body))
    deltas = [e["choices"][0] for e in events(r.text) if e != "[DONE]"]
    assert "".join(d["delta"].get("content") or "" for d in deltas) == said
    (with_calls,) = [d for d in deltas if "tool_calls" in d["delta"]]
    (call,) = with_calls["delta"]["tool_calls"]
    assert call["index"] == 0 and call["function"] == CALL
    assert deltas[-1]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(("tools", "choice", "says"), [
    (None, "required", "tool_choice: a required or named choice needs tools"),
    ([WEATHER], {"type": "function", "function": {"name": "g"}},
     "tool_choice: names a function which tools does not declare")])
def test_the_frontends_refusal_of_tool_fields_is_400_naming_the_field(
        tools: list[Any] | None, choice: Any, says: str) -> None:
    body = CHAT | {"tool_choice": choice} | ({"tools": tools} if tools else {})
    r = run(FakeFrontend(), lambda c: c.post("/v1/chat/completions", json=body))
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": says, "type": "invalid_request_error", "param": "tool_choice", "code": None}


def test_tools_map_onto_the_frontends_fields() -> None:
    frontend = FakeFrontend()
    call = {"id": "call_1", "type": "function", "function": CALL}
    run(frontend, lambda c: c.post("/v1/chat/completions", json={
        "model": "m", "tools": [WEATHER], "tool_choice": "required", "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]}))
    (request, _), = frontend.seen
    assert list(request.tools) == [common_pb2.Tool(
        name="get_weather", parameters='{"type": "object", "properties": {"city": {"type": '
                                       '"string"}}}')]
    assert request.tool_choice == generation_pb2.ToolChoice(
        mode=generation_pb2.TOOL_MODE_REQUIRED)
    assert list(request.chat.messages) == [
        generation_pb2.Message(role="system", content="Be brief."),
        generation_pb2.Message(role="user", content="Paris?"),
        generation_pb2.Message(role="assistant", tool_calls=[common_pb2.ToolCall(
            id="call_1", name="get_weather", arguments='{"city": "Paris"}')]),
        generation_pb2.Message(role="tool", content="sunny", tool_call_id="call_1")]
    assert not request.params.HasField("constraint")  # the frontend's to set


def test_plain_text_with_tools_is_content() -> None:
    body = CHAT | {"tools": [WEATHER], "seed": 2}
    r = run(FakeFrontend(), lambda c: c.post("/v1/chat/completions", json=body))
    (out,) = r.json()["choices"]
    assert out["message"] == {"role": "assistant", "content": "w2-0 w2-1 w2-2 ",
                              "refusal": None}
    assert out["finish_reason"] == "length"


def test_a_draining_service_fails_its_health_check() -> None:
    async def main() -> tuple[int, int]:
        api = HttpApi(generation_pb2_grpc.GenerationStub(grpc.aio.insecure_channel(
            "127.0.0.1:1")), max_request_s=1, max_body_bytes=4096)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api.app()),
                                     base_url="http://api") as client:
            before = (await client.get("/healthz")).status_code
            api.drain()
            return before, (await client.get("/healthz")).status_code
    assert asyncio.run(main()) == (200, 503)


def test_whole_answers_with_n_and_logprobs() -> None:
    frontend = FakeFrontend()
    r = run(frontend, lambda c: c.post("/v1/chat/completions", json=CHAT | {
        "n": 2, "seed": 3, "logprobs": True, "top_logprobs": 1}))
    body = r.json()
    assert [c["message"]["content"] for c in body["choices"]] == [
        "w3-0 w3-1 w3-2 ", "w4-0 w4-1 w4-2 "]
    assert body["usage"]["completion_tokens"] == 6
    (request, _), = frontend.seen
    assert (request.n, request.params.return_logprobs, request.params.logprobs) == (2, True, 1)
    text = run(FakeFrontend(), lambda c: c.post("/v1/completions", json={
        "model": "m", "prompt": "x", "seed": 0, "logprobs": 1})).json()["choices"][0]
    assert text["logprobs"] == {
        "tokens": ["w0-0 ", "w0-1 ", "w0-2 "], "token_logprobs": [-0.5] * 3,
        "top_logprobs": [{"w0-0 ": -0.5}, {"w0-1 ": -0.5}, {"w0-2 ": -0.5}],
        "text_offset": [0, 5, 10]}


def test_streamed_chat_logprobs_ride_with_their_text() -> None:
    r = run(FakeFrontend(), lambda c: c.post("/v1/chat/completions", json=CHAT | {
        "seed": 0, "stream": True, "logprobs": True}))
    chunks = [e["choices"][0] for e in events(r.text) if e != "[DONE]"]
    with_text = [c for c in chunks if c["delta"].get("content")]
    assert [c["logprobs"]["content"][0]["token"] for c in with_text] == [
        "w0-0 ", "w0-1 ", "w0-2 "]
    assert with_text[0]["logprobs"]["content"][0] == {
        "token": "w0-0 ", "logprob": -0.5, "bytes": list(b"w0-0 "),
        "top_logprobs": [{"token": "w0-0 ", "logprob": -0.5, "bytes": list(b"w0-0 ")}]}
