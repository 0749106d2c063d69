"""Tool calls: the prompt the model reads, the grammar of a forced call, and the calls
parsed back out of whole and streamed text."""

from __future__ import annotations

import json

import jsonschema
import pytest

from services.httpapi.schema import chat_request
from services.httpapi.tools import (
    Mode,
    StreamedCalls,
    Tools,
    calls_in,
    parse_tools,
    system_prompt,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"]}}}


def tools(choice: object = None) -> Tools:
    parsed = parse_tools([WEATHER, TIME], choice)
    assert parsed is not None
    return parsed


def test_tool_choices() -> None:
    assert tools().mode is Mode.AUTO and tools("none").mode is Mode.NONE
    assert tools("required").mode is Mode.REQUIRED
    named = tools({"type": "function", "function": {"name": "get_time"}})
    assert (named.mode, named.named) == (Mode.NAMED, "get_time")
    assert parse_tools(None, None) is None and parse_tools([], "auto") is None


def test_the_functions_are_described_in_the_system_message() -> None:
    parsed = chat_request({"model": "m", "tools": [WEATHER], "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris?"}]})
    system, user = parsed.request.chat.messages
    assert system.role == "system" and system.content.startswith("Be brief.\n\n")
    assert json.dumps(WEATHER, separators=(", ", ": ")) in system.content
    assert "<tool_call>" in system.content and user.content == "Paris?"
    assert parsed.tools is not None and not parsed.request.params.HasField("constraint")


def test_none_shows_no_tools() -> None:
    parsed = chat_request({"model": "m", "tools": [WEATHER], "tool_choice": "none",
                           "messages": [{"role": "user", "content": "Paris?"}]})
    assert [m.role for m in parsed.request.chat.messages] == ["user"]
    assert parsed.tools is None


def test_calls_and_results_go_back_into_the_conversation() -> None:
    call = {"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
    parsed = chat_request({"model": "m", "tools": [WEATHER], "messages": [
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "22C"}]})
    msgs = [(m.role, m.content) for m in parsed.request.chat.messages]
    assert msgs[1:] == [
        ("user", "Paris?"),
        ("assistant", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
                      "\n</tool_call>"),
        ("user", "<tool_response>\nsunny\n</tool_response>\n"
                 "<tool_response>\n22C\n</tool_response>")]


def test_a_forced_choice_is_a_grammar_over_the_declared_calls() -> None:
    parsed = chat_request({"model": "m", "tools": [WEATHER, TIME], "tool_choice": "required",
                           "messages": [{"role": "user", "content": "x"}]})
    schema = json.loads(parsed.request.params.constraint.json_schema.schema)
    jsonschema.validate({"name": "get_time", "arguments": {"zone": "UTC"}}, schema)
    for wrong in ({"name": "get_time", "arguments": {"zone": "PST"}},
                  {"name": "other", "arguments": {}}, {"name": "get_weather"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    named = chat_request({"model": "m", "tools": [WEATHER, TIME], "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}},
        "messages": [{"role": "user", "content": "x"}]})
    one = json.loads(named.request.params.constraint.json_schema.schema)
    assert one["properties"]["name"] == {"const": "get_weather"}


def test_calls_are_parsed_out_of_auto_text() -> None:
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call>\n<tool_call>{"name": "nope", "arguments": {}}'
            "</tool_call>")
    content, calls = calls_in(text, tools())
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_")
    assert content == ('Let me check.\n\n<tool_call>{"name": "nope", "arguments": {}}'
                       "</tool_call>")
    assert calls_in("no calls here", tools()) == ("no calls here", [])


def test_a_forced_call_is_the_whole_text() -> None:
    content, calls = calls_in('{"name": "get_time", "arguments": {"zone": "CET"}}',
                              tools("required"))
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
    forced = StreamedCalls(tools("required"))
    assert forced.feed('{"name": "get_time", ') == ""


def test_the_prompt_names_every_function() -> None:
    prompt = system_prompt(tools())
    assert "get_weather" in prompt and "get_time" in prompt
