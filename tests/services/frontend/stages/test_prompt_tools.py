"""The prompt stage with tools, over the real tokenizer servicer in this process: a model
whose template takes tools renders them itself, any other gets them in its system message;
the stage asks which once per model."""

from __future__ import annotations

from typing import Any

import grpc
from tokenizers import Tokenizer, models, pre_tokenizers

from genmesh.core.models.chat_template import ChatMessage, ChatTemplate
from genmesh.v1 import tokenizer_pb2
from services.frontend.stages.prompt import Tokenize
from services.frontend.tools import tools_of
from services.tokenizer.registry import LoadedTokenizer, TokenizerRegistry
from services.tokenizer.servicer import TokenizerServicer
from tests.services.frontend.stages.fakes import Upstream, call_of, collect, request, run
from tests.services.frontend.test_tools import (
    HISTORY,
    PLAIN,
    WEATHER,
    WEATHER_FUNCTION,
    WEATHER_SPEC,
    WITH_TOOLS,
)
from tests.services.frontend.test_tools import request as generate_request


class _Context:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"the tokenizer refused: {code.name}: {details}")


class InProcessTokenizer:
    """The tokenizer service's servicer behind a stub's interface; keeps what it rendered
    and counts DescribeModel calls."""

    def __init__(self, templates: dict[str, str]) -> None:
        words = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
        words.pre_tokenizer = pre_tokenizers.Whitespace()  # type: ignore[assignment]
        self.servicer = TokenizerServicer(TokenizerRegistry(
            LoadedTokenizer(name, words, ChatTemplate(source), (), 1)
            for name, source in templates.items()))
        self.rendered: list[str] = []
        self.num_described = 0
        self.stage = Tokenize(self, rpc_timeout_s=1.0)  # type: ignore[arg-type]

    async def ApplyChatTemplate(self, request: tokenizer_pb2.ChatTemplateRequest, *,
                                timeout: float) -> tokenizer_pb2.TokenizeResponse:
        reply = await self.servicer.ApplyChatTemplate(request, _Context())  # type: ignore[arg-type]
        self.rendered.append(reply.text)
        return reply

    async def DescribeModel(self, request: tokenizer_pb2.DescribeModelRequest, *,
                            timeout: float) -> tokenizer_pb2.ModelDescription:
        self.num_described += 1
        return await self.servicer.DescribeModel(request, _Context())  # type: ignore[arg-type]


def rendered(tokenizer: InProcessTokenizer, model: str, messages: tuple[ChatMessage, ...],
             **fields: Any) -> str:
    """What ``tokenizer``'s one prompt stage had rendered for a chat of ``model``."""
    call = call_of(request(prompt=None, model=model, messages=messages, **fields))
    run(collect(tokenizer.stage.run(call, Upstream())))
    assert call.prompt_ids and set(call.prompt_ids) == {0}  # the rendered text, tokenized
    return tokenizer.rendered[-1]


def test_each_model_gets_the_tools_its_template_can_take() -> None:
    tokenizer = InProcessTokenizer({"plain": PLAIN, "tooled": WITH_TOOLS})
    weather = tools_of(generate_request(WEATHER))
    assert rendered(tokenizer, "tooled", HISTORY, tools=weather) == (
        f"<|system|>Be brief.\nTools:\n{WEATHER_FUNCTION}\n"
        "<|user|>Paris?\n"
        '<|assistant|>[get_weather({"city": "Paris"}) #call_1]\n'
        "<|tool call_1|>sunny\n<|tool call_2|>22C\n<|assistant|>")
    plain = rendered(tokenizer, "plain", HISTORY, tools=weather)
    assert plain.startswith("<|system|>Be brief.\n\nYou are a function calling AI model.")
    assert f"<tools>\n{WEATHER_SPEC}\n</tools>" in plain
    assert plain.endswith(
        "<|user|>Paris?\n"
        '<|assistant|><tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call>\n"
        "<|user|><tool_response>\nsunny\n</tool_response>\n<tool_response>\n22C\n"
        "</tool_response>\n<|assistant|>")
    # Asked once per model; a chat without tools does not ask.
    rendered(tokenizer, "tooled", HISTORY, tools=weather)
    rendered(tokenizer, "tooled", (ChatMessage("user", "Hi"),))
    assert tokenizer.num_described == 2
    assert tokenizer.rendered[-1] == "<|user|>Hi\n<|assistant|>"
