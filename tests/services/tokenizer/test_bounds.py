"""The tokenizer's own bounds on one call (``--max-text-chars``, ``--max-chat-messages``):
exact refusals before any work, defaults above the deployment's limits (which the
frontend enforces first), and render + tokenize time linear in the chat's size."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from genmesh.core.deployment import Limits
from genmesh.core.models.chat_template import ChatMessage
from genmesh.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.common.server import new_server
from services.safety.config import SafetyConfig
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.registry import TokenizerRegistry, load_tokenizer
from services.tokenizer.servicer import TokenizerServicer, apply_chat_template

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def registry(model_dir) -> TokenizerRegistry:
    return TokenizerRegistry([load_tokenizer(MODEL, model_dir)])


def call(registry: TokenizerRegistry, method: str, request) -> tuple[grpc.StatusCode, str]:
    """``method`` on an in-process tokenizer bounded to 20 characters and 3 messages."""
    async def run() -> tuple[grpc.StatusCode, str]:
        server = new_server()
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server(TokenizerServicer(
            registry, max_text_chars=20, max_chat_messages=3), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = tokenizer_pb2_grpc.TokenizerStub(channel)
                try:
                    await getattr(stub, method)(request, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), exc.details() or ""
                return grpc.StatusCode.OK, ""
        finally:
            await server.stop(None)

    return asyncio.run(run())


def chat(*contents: str) -> tokenizer_pb2.ChatTemplateRequest:
    return tokenizer_pb2.ChatTemplateRequest(model=MODEL, add_generation_prompt=True, messages=[
        tokenizer_pb2.ChatMessage(role="user", content=c) for c in contents])


def test_calls_within_the_bounds_are_served(registry):
    assert call(registry, "Tokenize", tokenizer_pb2.TokenizeRequest(
        model=MODEL, text="x" * 20))[0] == grpc.StatusCode.OK
    assert call(registry, "ApplyChatTemplate", chat("abc", "def", "x" * 14))[0] == (
        grpc.StatusCode.OK)


def test_calls_past_the_bounds_are_refused_naming_them(registry):
    assert call(registry, "Tokenize", tokenizer_pb2.TokenizeRequest(
        model=MODEL, text="x" * 21)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "the text has 21 characters; the tokenizer takes at most 20 (its --max-text-chars)")
    assert call(registry, "ApplyChatTemplate", chat("a", "b", "c", "d")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "the chat has 4 messages; the tokenizer takes at most 3 (its --max-chat-messages)")
    assert call(registry, "ApplyChatTemplate", chat("x" * 10, "y" * 11)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "the chat's messages have 21 characters; the "
        "tokenizer takes at most 20 (its --max-text-chars)")


def test_the_services_bounds_admit_whatever_the_deployment_admits():
    limits, tokenizer = Limits(), TokenizerConfig()
    assert tokenizer.max_text_chars >= limits.max_prompt_chars
    assert tokenizer.max_chat_messages >= limits.max_chat_messages
    assert SafetyConfig().max_text_chars >= limits.max_prompt_chars


def test_render_and_tokenize_time_grows_linearly_with_the_chat(registry):
    t = registry.get(MODEL)

    def best_seconds(num_messages: int) -> float:
        messages = [ChatMessage("user" if i % 2 == 0 else "assistant", f"message {i:05d} ok")
                    for i in range(num_messages)]
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            apply_chat_template(t, messages, add_generation_prompt=True)
            timings.append(time.perf_counter() - started)
        return min(timings)

    small, large = best_seconds(500), best_seconds(2000)
    assert large < 8 * small  # 4x the messages: 4x the time, not 16x
    assert large < 0.25  # 2,000 messages (~27k tokens) in well under a second
