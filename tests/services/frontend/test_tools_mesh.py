"""Tool calls through the gRPC API end to end (the session's ``mesh``: Envoy's edge, the
frontend, tokenizer, safety and worker processes). The default model's template takes no
tools, so it reads them in its system message; with tool_choice REQUIRED every answer is
a valid call of a declared function, whole and streamed."""

from __future__ import annotations

import json
from typing import Any

import grpc
import jsonschema
import pytest

from genmesh.client.types import DEV_API_KEY
from genmesh.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
    "required": ["city", "unit"], "additionalProperties": False}
CONVERT = {"type": "object", "properties": {
    "amount": {"type": "number"}, "to": {"type": "string", "enum": ["EUR", "USD"]}},
    "required": ["amount", "to"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "convert": CONVERT}
TOOLS = [common_pb2.Tool(name="get_weather", description="Current weather in a city.",
                         parameters=json.dumps(WEATHER)),
         common_pb2.Tool(name="convert", description="Convert an amount of money.",
                         parameters=json.dumps(CONVERT))]
METADATA = [("x-api-key", DEV_API_KEY)]


@pytest.fixture(scope="module")
def stub(mesh):
    with grpc.insecure_channel(mesh.edge_address) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


def ask(question: str, choice: generation_pb2.ToolChoice, **fields: Any
        ) -> generation_pb2.GenerateRequest:
    request = generation_pb2.GenerateRequest(tools=TOOLS, tool_choice=choice, **fields)
    request.chat.messages.add(role="user", content=question)
    return request


def assert_valid(calls) -> None:
    (call,) = calls
    assert call.id.startswith("call_") and call.name in SCHEMAS
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_required_tool_choice_always_gives_a_valid_call(stub):
    required = generation_pb2.ToolChoice(mode=generation_pb2.TOOL_MODE_REQUIRED)
    params = common_pb2.SamplingParams(max_tokens=60, temperature=0.7, seed=3)
    reply = stub.Generate(ask("Convert 20 dollars to euros.", required, params=params, n=3),
                          metadata=METADATA, timeout=120)
    assert len(reply.choices) == 3
    for choice in reply.choices:
        assert choice.text == "" and choice.finish_reason == common_pb2.FINISH_REASON_STOP
        assert_valid(choice.tool_calls)
    assert list(reply.tool_calls) == list(reply.choices[0].tool_calls)
    messages = list(stub.GenerateStream(ask("Is it raining in Oslo?", required, params=params),
                                        metadata=METADATA, timeout=120))
    assert "".join(m.text for m in messages) == ""
    assert messages[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert_valid(messages[-1].tool_calls)
    assert not any(m.tool_calls for m in messages[:-1])


def test_a_named_call_and_its_result_go_back_into_the_conversation(mesh, stub):
    named = generation_pb2.ToolChoice(function="get_weather")
    params = common_pb2.SamplingParams(max_tokens=60)
    first = stub.Generate(ask("Weather in Rome?", named, params=params), metadata=METADATA,
                          timeout=120)
    (call,) = first.tool_calls
    assert call.name == "get_weather"
    follow = ask("Weather in Rome?", generation_pb2.ToolChoice(
        mode=generation_pb2.TOOL_MODE_NONE), params=common_pb2.SamplingParams(max_tokens=12))
    follow.chat.messages.add(role="assistant", tool_calls=[call])
    follow.chat.messages.add(role="tool", tool_call_id=call.id, content="sunny, 24 C")
    reply = stub.Generate(follow, metadata=METADATA, timeout=120)
    assert reply.text and not reply.tool_calls
    # The model read the call and its result in the system-prompt format (its template
    # takes no tools), and no functions (tool_choice NONE):
    with mesh.service_channel("tokenizer") as channel:
        rendered = tokenizer_pb2_grpc.TokenizerStub(channel).ApplyChatTemplate(
            tokenizer_pb2.ChatTemplateRequest(model=mesh.model, add_generation_prompt=True,
                                              messages=[
                tokenizer_pb2.ChatMessage(role="user", content="Weather in Rome?"),
                tokenizer_pb2.ChatMessage(role="assistant", content=(
                    f'<tool_call>\n{{"name": "get_weather", "arguments": {call.arguments}}}'
                    "\n</tool_call>")),
                tokenizer_pb2.ChatMessage(role="user", content=(
                    "<tool_response>\nsunny, 24 C\n</tool_response>"))]), timeout=30)
    assert reply.usage.prompt_tokens == len(rendered.token_ids)
