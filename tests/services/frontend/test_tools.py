"""Tool calls in the frontend: the request's fields, the prompt the model reads (through a
template that takes tools, or in the system message), the grammar of a forced call, and
the calls parsed back out of whole and streamed text."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator
from typing import Any

import grpc
import jsonschema
import pytest

from genmesh.core.models.chat_template import ChatMessage, ChatTemplate, ToolCall
from genmesh.v1 import common_pb2, generation_pb2
from services.frontend.errors import PipelineError
from services.frontend.events import ChunkLogprob, Event, Finished, Started, TextChunk
from services.frontend.tools import (
    Mode,
    StreamedCalls,
    Tools,
    calls_in,
    chat_messages,
    constraint,
    fallback_messages,
    system_prompt,
    template_request,
    tools_of,
    with_tool_calls,
)
from services.tokenizer.servicer import chat_messages as tokenizer_messages
from services.tokenizer.servicer import tool_specs

WEATHER = common_pb2.Tool(name="get_weather", description="The weather in a city.",
                          parameters=json.dumps({"type": "object", "properties": {
                              "city": {"type": "string"}}, "required": ["city"]}))
TIME = common_pb2.Tool(name="get_time", parameters=json.dumps({
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"]}))
WEATHER_FUNCTION = ('{"name": "get_weather", "description": "The weather in a city.", '
                    '"parameters": {"type": "object", "properties": {"city": {"type": '
                    '"string"}}, "required": ["city"]}}')
WEATHER_SPEC = '{"type": "function", "function": ' + WEATHER_FUNCTION + "}"


def request(*tools: common_pb2.Tool, choice: generation_pb2.ToolChoice | None = None,
            messages: tuple[generation_pb2.Message, ...] = (
                generation_pb2.Message(role="user", content="Paris?"),)
            ) -> generation_pb2.GenerateRequest:
    req = generation_pb2.GenerateRequest(tools=tools)
    req.chat.messages.extend(messages)
    if choice is not None:
        req.tool_choice.CopyFrom(choice)
    return req


def mode(value: int) -> generation_pb2.ToolChoice:
    return generation_pb2.ToolChoice(mode=value)  # type: ignore[arg-type]


def tools(choice: generation_pb2.ToolChoice | None = None) -> Tools:
    parsed = tools_of(request(WEATHER, TIME, choice=choice))
    assert parsed is not None
    return parsed


# ---- the request ---------------------------------------------------------------------

def test_tool_choices() -> None:
    assert tools().mode is Mode.AUTO
    assert tools(mode(generation_pb2.TOOL_MODE_AUTO)).mode is Mode.AUTO
    assert tools(mode(generation_pb2.TOOL_MODE_NONE)).mode is Mode.NONE
    assert tools(mode(generation_pb2.TOOL_MODE_REQUIRED)).mode is Mode.REQUIRED
    named = tools(generation_pb2.ToolChoice(function="get_time"))
    assert (named.mode, named.named) == (Mode.NAMED, "get_time")
    assert tools_of(request()) is None
    assert tools_of(request(choice=mode(generation_pb2.TOOL_MODE_NONE))) is None
    bare = tools_of(request(common_pb2.Tool(name="f")))
    assert bare is not None
    assert [f.parameters for f in bare.functions] == [{"type": "object", "properties": {}}]


@pytest.mark.parametrize(("req", "says"), [
    (request(choice=mode(generation_pb2.TOOL_MODE_REQUIRED)),
     "tool_choice: a required or named choice needs tools"),
    (request(choice=generation_pb2.ToolChoice(function="f")),
     "tool_choice: a required or named choice needs tools"),
    (request(WEATHER, choice=generation_pb2.ToolChoice(function="get_time")),
     "tool_choice: names a function which tools does not declare"),
    (request(WEATHER, choice=mode(9)), "tool_choice: unknown mode 9; use one of "
     "TOOL_MODE_UNSPECIFIED, TOOL_MODE_AUTO, TOOL_MODE_NONE, TOOL_MODE_REQUIRED"),
    (request(WEATHER, WEATHER), "tools: the same function name is declared twice"),
    (request(common_pb2.Tool(name="get weather")),
     "tools[0].name: must be 1-64 letters, digits, _ or -"),
    (request(WEATHER, common_pb2.Tool(name="f", parameters="[1]")),
     "tools[1].parameters: must be the JSON text of a JSON Schema object"),
    (generation_pb2.GenerateRequest(prompt="x", tools=[WEATHER]),
     "tools: only with a chat (chat.messages), not a raw prompt"),
])
def test_bad_tool_fields_are_invalid_naming_the_field(req: generation_pb2.GenerateRequest,
                                                      says: str) -> None:
    with pytest.raises(PipelineError) as info:
        tools_of(req)
    assert (info.value.code, info.value.message) == (grpc.StatusCode.INVALID_ARGUMENT, says)


CALL = common_pb2.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')


@pytest.mark.parametrize(("message", "says"), [
    (generation_pb2.Message(role="user", content="x", tool_calls=[CALL]),
     "chat.messages[0].tool_calls: only an assistant message makes calls"),
    (generation_pb2.Message(role="tool", content="sunny"),
     "chat.messages[0].tool_call_id: required for a tool message, and only there"),
    (generation_pb2.Message(role="user", content="x", tool_call_id="call_1"),
     "chat.messages[0].tool_call_id: required for a tool message, and only there"),
    (generation_pb2.Message(role="assistant", tool_calls=[common_pb2.ToolCall(
        name="f", arguments="[]")]),
     "chat.messages[0].tool_calls[0].arguments: must be the JSON text of an object"),
])
def test_bad_tool_messages_are_invalid(message: generation_pb2.Message, says: str) -> None:
    with pytest.raises(PipelineError) as info:
        chat_messages([message])
    assert info.value.message == says


def test_a_forced_choice_is_a_grammar_over_the_declared_calls() -> None:
    forced = constraint(tools(mode(generation_pb2.TOOL_MODE_REQUIRED)))
    assert forced is not None and not forced.json_schema.strict
    schema = json.loads(forced.json_schema.schema)
    jsonschema.validate({"name": "get_time", "arguments": {"zone": "UTC"}}, schema)
    for wrong in ({"name": "get_time", "arguments": {"zone": "PST"}},
                  {"name": "other", "arguments": {}}, {"name": "get_weather"},
                  {"name": "get_weather", "arguments": {"city": "Oslo"}, "x": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    named = constraint(tools(generation_pb2.ToolChoice(function="get_weather")))
    assert named is not None
    assert json.loads(named.json_schema.schema) == {
        "type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {
            "type": "object", "properties": {"city": {"type": "string"}},
            "required": ["city"]}},
        "required": ["name", "arguments"], "additionalProperties": False}
    assert constraint(tools()) is None


# ---- the prompt: a template without tools (the system-prompt fallback) ----------------

HISTORY = (ChatMessage("system", "Be brief."), ChatMessage("user", "Paris?"),
           ChatMessage("assistant", "", tool_calls=(ToolCall(
               "call_1", "get_weather", '{"city": "Paris"}'),)),
           ChatMessage("tool", "sunny", tool_call_id="call_1"),
           ChatMessage("tool", "22C", tool_call_id="call_2"))
# A template that knows no tools: SmolLM2's shape.
PLAIN = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] + '\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_without_template_support_the_functions_join_the_system_message() -> None:
    weather = tools_of(request(WEATHER))
    messages = fallback_messages(HISTORY, weather)
    assert [(m.role, m.content) for m in messages] == [
        ("system", "Be brief.\n\n" + system_prompt(weather)),  # type: ignore[arg-type]
        ("user", "Paris?"),
        ("assistant", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
                      "\n</tool_call>"),
        ("user", "<tool_response>\nsunny\n</tool_response>\n"
                 "<tool_response>\n22C\n</tool_response>")]
    # Through the tokenizer's renderer, exactly:
    req = template_request("m", HISTORY, weather, template_takes_tools=False)
    assert not req.tools and req.add_generation_prompt
    rendered = ChatTemplate(PLAIN).render(tokenizer_messages(
        req.messages, max_chat_messages=10, max_text_chars=10_000))
    assert rendered == (
        "<|system|>Be brief.\n\n"
        "You are a function calling AI model. You may call one or more functions to assist "
        "with the user query. Don't make assumptions about what values to plug into "
        "functions. Here are the available tools:\n"
        f"<tools>\n{WEATHER_SPEC}\n</tools>\n"
        "For each function call, return a JSON object with the function name and arguments "
        "within <tool_call></tool_call> tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call>\n"
        "<|user|>Paris?\n"
        '<|assistant|><tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call>\n"
        "<|user|><tool_response>\nsunny\n</tool_response>\n<tool_response>\n22C\n"
        "</tool_response>\n<|assistant|>")


def test_without_tools_shown_the_conversation_is_plain() -> None:
    plain = (ChatMessage("user", "Paris?"),)
    assert fallback_messages(plain, None) == list(plain)
    only_system = fallback_messages(plain, tools_of(request(WEATHER)))
    assert [m.role for m in only_system] == ["system", "user"]
    req = template_request("m", plain, None, template_takes_tools=False)
    assert [(m.role, m.content) for m in req.messages] == [("user", "Paris?")]


# ---- the prompt: a template that takes tools ------------------------------------------

# A template that takes tools, in the shape of Qwen2.5's: the functions in the system
# turn, calls and results through the template's own markup.
# (A newline right after a block tag is dropped, as transformers renders: hence {{ NL }}.)
WITH_TOOLS = (
    "{% set NL = '\\n' %}"
    "{% if tools %}<|system|>{% if messages[0].role == 'system' %}{{ messages[0].content }}"
    "{{ NL }}{% endif %}Tools:{% for t in tools %}{{ NL }}{{ t.function | tojson }}"
    "{% endfor %}{{ NL }}{% endif %}"
    "{% for m in messages %}{% if m.role == 'system' and tools %}"
    "{% elif m.role == 'tool' %}<|tool {{ m.tool_call_id }}|>{{ m.content }}{{ NL }}"
    "{% elif m.tool_calls %}<|assistant|>{% for c in m.tool_calls %}"
    "[{{ c.function.name }}({{ c.function.arguments | tojson }}) #{{ c.id }}]{% endfor %}"
    "{{ NL }}{% else %}<|{{ m.role }}|>{{ m.content }}{{ NL }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_a_template_that_takes_tools_renders_them_itself() -> None:
    template = ChatTemplate(WITH_TOOLS)
    assert template.supports_tools and not ChatTemplate(PLAIN).supports_tools
    weather = tools_of(request(WEATHER))
    req = template_request("m", HISTORY, weather, template_takes_tools=True)
    assert [(t.name, json.loads(t.parameters)) for t in req.tools] == [
        ("get_weather", json.loads(WEATHER.parameters))]
    assert [(m.role, m.tool_call_id, len(m.tool_calls)) for m in req.messages] == [
        ("system", "", 0), ("user", "", 0), ("assistant", "", 1), ("tool", "call_1", 0),
        ("tool", "call_2", 0)]
    rendered = template.render(
        tokenizer_messages(req.messages, max_chat_messages=10, max_text_chars=10_000),
        tools=tool_specs(req.tools))
    assert rendered == (
        f"<|system|>Be brief.\nTools:\n{WEATHER_FUNCTION}\n"
        "<|user|>Paris?\n"
        '<|assistant|>[get_weather({"city": "Paris"}) #call_1]\n'
        "<|tool call_1|>sunny\n<|tool call_2|>22C\n<|assistant|>")
    # tool_choice none: the history goes through the template, no functions do.
    bare = template_request("m", HISTORY[1:3], None, template_takes_tools=True)
    assert not bare.tools
    assert template.render(tokenizer_messages(bare.messages, max_chat_messages=10,
                                              max_text_chars=10_000)) == (
        '<|user|>Paris?\n<|assistant|>[get_weather({"city": "Paris"}) #call_1]\n'
        "<|assistant|>")


def test_tools_for_a_template_without_them_are_refused() -> None:
    with pytest.raises(ValueError, match="does not take tools"):
        ChatTemplate(PLAIN).render([ChatMessage("user", "x")], tools=tool_specs([WEATHER]))


# ---- the output ----------------------------------------------------------------------

def test_calls_are_parsed_out_of_auto_text() -> None:
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call>\n<tool_call>{"name": "nope", "arguments": {}}'
            "</tool_call>")
    content, calls = calls_in(text, tools())
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_") and len(calls[0].id) == 29
    assert content == ('Let me check.\n\n<tool_call>{"name": "nope", "arguments": {}}'
                       "</tool_call>")
    assert calls_in("no calls here", tools()) == ("no calls here", [])


def test_a_forced_call_is_the_whole_text() -> None:
    content, calls = calls_in('{"name": "get_time", "arguments": {"zone": "CET"}}',
                              tools(mode(generation_pb2.TOOL_MODE_REQUIRED)))
    assert content == "" and [(c.name, c.arguments) for c in calls] == [
        ("get_time", '{"zone": "CET"}')]


def test_streamed_content_stops_at_a_call_and_holds_a_partial_tag() -> None:
    s = StreamedCalls(tools())
    assert [s.feed(t) for t in ("Sure", ", one", " moment <tool", "_call>{\"name\": ",
                                '"get_weather", "arguments": {"city": "Oslo"}}',
                                "</tool_call>")] == ["Sure", ", one", " moment ", "", "", ""]
    rest, calls = s.finish()
    assert rest == "" and [c.name for c in calls] == ["get_weather"]


def test_streamed_text_without_calls_is_all_content() -> None:
    s = StreamedCalls(tools())
    assert s.feed("a <") == "a "
    assert s.feed("b") == "<b"
    assert s.finish() == ("", [])
    forced = StreamedCalls(tools(mode(generation_pb2.TOOL_MODE_REQUIRED)))
    assert forced.feed('{"name": "get_time", ') == ""


def lp(token_id: int, end: int) -> ChunkLogprob:
    return ChunkLogprob(end, generation_pb2.OutputLogprob(token_id=token_id))


async def scripted(*events: Event) -> AsyncGenerator[Event, None]:
    for event in events:
        yield event


def run_events(events: AsyncGenerator[Event, None], parsed: Tools) -> list[Any]:
    async def main() -> list[Any]:
        out = with_tool_calls(events, parsed)
        async with contextlib.aclosing(out):
            return [e async for e in out]
    return asyncio.run(main())


def test_each_choices_calls_come_on_its_finish() -> None:
    """Two choices interleaved: choice 0 says something, then calls; choice 1 answers in
    text. Text streams with its tokens' logprobs; the call's tokens are not reported."""
    started = Started("r1", "m", "v1", 5)
    out = run_events(scripted(
        started,
        TextChunk("Sure. <tool", logprobs=(lp(1, 5), lp(2, 11)), index=0),
        TextChunk("It is", logprobs=(lp(7, 5),), index=1),
        TextChunk('_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>',
                  logprobs=(lp(3, 20),), index=0),
        Finished(common_pb2.FINISH_REASON_STOP, index=0),
        TextChunk(" <b>sunny</b>", logprobs=(lp(8, 13),), index=1),
        Finished(common_pb2.FINISH_REASON_LENGTH, index=1)), tools())
    assert out[:3] == [started, TextChunk("Sure. ", logprobs=(lp(1, 5),), index=0),
                       TextChunk("It is", logprobs=(lp(7, 5),), index=1)]
    finished = out[3]
    assert isinstance(finished, Finished) and finished.index == 0
    (call,) = finished.tool_calls
    assert (call.name, call.arguments) == ("get_time", '{"zone": "UTC"}')
    assert out[4:] == [TextChunk(" <b>sunny</b>", logprobs=(lp(8, 13),), index=1),
                       Finished(common_pb2.FINISH_REASON_LENGTH, index=1)]


def test_a_forced_call_cut_short_stays_text() -> None:
    cut = '{"name": "get_time", "argu'
    out = run_events(scripted(TextChunk(cut, logprobs=(lp(4, len(cut)),)),
                              Finished(common_pb2.FINISH_REASON_LENGTH)),
                     tools(mode(generation_pb2.TOOL_MODE_REQUIRED)))
    assert out == [TextChunk(cut, is_final=True, logprobs=(lp(4, len(cut)),)),
                   Finished(common_pb2.FINISH_REASON_LENGTH)]
