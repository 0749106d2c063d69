"""Tool calls (GenerateRequest.tools and .tool_choice) over a model that generates text:
the one place they are decided, for the gRPC API and the HTTP API alike (which maps
OpenAI's JSON onto those fields).

- The prompt (``template_request``): a model whose chat template takes tools reads the
  functions through it, and the conversation's calls and results as structured messages.
  Any other reads them in the format Hermes- and Qwen-style templates use: the functions'
  JSON inside ``<tools></tools>`` in a system message, each call the model makes as
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, results as
  ``<tool_response>`` in a user turn, and an assistant turn that called tools with its
  calls written out.
- The grammar (``constraint``): ``required`` and a named function enforce one JSON object
  ``{"name": <a declared function>, "arguments": <its parameters>}`` while decoding, so
  the call always names a declared function and its arguments validate against its
  schema.
- The output (``with_tool_calls``): under ``auto`` a choice's text streams until a
  ``<tool_call>`` opens (a partial opening tag at the end is held back) and its calls are
  parsed when it ends; a call that does not parse stays text. ``none`` shows the model
  no functions and parses nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import grpc

from genmesh.core.models.chat_template import ChatMessage, ToolCall
from genmesh.v1 import common_pb2, generation_pb2, tokenizer_pb2
from services.frontend.errors import PipelineError
from services.frontend.events import Event, Finished, TextChunk
from services.frontend.logprobs import LogprobLedger

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_TOOLS = 128
MAX_NAME_CHARS = 64
_NO_PARAMETERS = {"type": "object", "properties": {}}


class Mode(StrEnum):
    AUTO = "auto"
    NONE = "none"
    REQUIRED = "required"
    NAMED = "named"  # one function, named in tool_choice


_MODES = {generation_pb2.TOOL_MODE_UNSPECIFIED: Mode.AUTO,
          generation_pb2.TOOL_MODE_AUTO: Mode.AUTO,
          generation_pb2.TOOL_MODE_NONE: Mode.NONE,
          generation_pb2.TOOL_MODE_REQUIRED: Mode.REQUIRED}


@dataclass(frozen=True, slots=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON Schema of the arguments object

    def spec(self) -> dict[str, Any]:
        """OpenAI's (and HF templates') description of the function."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": self.parameters}}


@dataclass(frozen=True, slots=True)
class Tools:
    functions: tuple[Function, ...]
    mode: Mode
    named: str = ""  # with Mode.NAMED

    @property
    def is_forced(self) -> bool:
        return self.mode in (Mode.REQUIRED, Mode.NAMED)

    @property
    def is_shown(self) -> bool:
        return self.mode is not Mode.NONE and bool(self.functions)


def _invalid(message: str) -> PipelineError:
    return PipelineError(grpc.StatusCode.INVALID_ARGUMENT, message)


# ---- the request ---------------------------------------------------------------------

def tools_of(request: generation_pb2.GenerateRequest) -> Tools | None:
    """The request's tools and tool choice; None when it declares no tools. PipelineError
    (INVALID_ARGUMENT, naming the field) for what cannot run."""
    choice = request.tool_choice
    kind = choice.WhichOneof("choice")
    if kind == "mode" and choice.mode not in _MODES:
        raise _invalid(f"tool_choice: unknown mode {choice.mode}; use one of "
                       f"{', '.join(generation_pb2.ToolMode.keys())}")
    if not request.tools:
        if kind == "function" or (kind == "mode" and _MODES[choice.mode] is Mode.REQUIRED):
            raise _invalid("tool_choice: a required or named choice needs tools")
        return None
    if request.WhichOneof("input") != "chat":
        raise _invalid("tools: only with a chat (chat.messages), not a raw prompt")
    if len(request.tools) > MAX_TOOLS:
        raise _invalid(f"tools: at most {MAX_TOOLS}, got {len(request.tools)}")
    functions = tuple(_function(t, i) for i, t in enumerate(request.tools))
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise _invalid("tools: the same function name is declared twice")
    if kind == "function":
        if choice.function not in names:  # a declared name is short: it can be quoted
            raise _invalid("tool_choice: names a function which tools does not declare")
        return Tools(functions, Mode.NAMED, named=choice.function)
    return Tools(functions, _MODES[choice.mode])


def _function(tool: common_pb2.Tool, i: int) -> Function:
    if not 0 < len(tool.name) <= MAX_NAME_CHARS or not all(
            c.isascii() and (c.isalnum() or c in "_-") for c in tool.name):
        raise _invalid(f"tools[{i}].name: must be 1-{MAX_NAME_CHARS} letters, digits, _ or "
                       "-")
    try:
        parameters = json.loads(tool.parameters) if tool.parameters else _NO_PARAMETERS
    except json.JSONDecodeError:
        parameters = None
    if not isinstance(parameters, dict):
        raise _invalid(f"tools[{i}].parameters: must be the JSON text of a JSON Schema object")
    return Function(tool.name, tool.description, parameters)


def chat_messages(messages: Sequence[generation_pb2.Message]) -> tuple[ChatMessage, ...]:
    """The conversation as domain messages; PipelineError for calls or call ids where
    they do not belong, a tool message without its call's id, or arguments that are not
    the JSON text of an object."""
    out = []
    for i, m in enumerate(messages):
        where = f"chat.messages[{i}]"
        if m.tool_calls and m.role != "assistant":
            raise _invalid(f"{where}.tool_calls: only an assistant message makes calls")
        if (m.role == "tool") != bool(m.tool_call_id):
            raise _invalid(f"{where}.tool_call_id: required for a tool message, and only "
                           "there")
        for j, call in enumerate(m.tool_calls):
            if not isinstance(_arguments(call.arguments), dict):
                raise _invalid(f"{where}.tool_calls[{j}].arguments: must be the JSON text of "
                               "an object")
        out.append(ChatMessage(m.role, m.content, tool_call_id=m.tool_call_id,
                               tool_calls=tuple(ToolCall(c.id, c.name, c.arguments)
                                                for c in m.tool_calls)))
    return tuple(out)


def _arguments(text: str) -> Any:
    try:
        return json.loads(text or "{}")
    except json.JSONDecodeError:
        return None


def constraint(tools: Tools) -> common_pb2.Constraint | None:
    """For required and named choices: the output must be one call of a declared
    function whose arguments validate against its parameters."""
    if not tools.is_forced:
        return None
    chosen = [f for f in tools.functions if tools.mode is Mode.REQUIRED or f.name == tools.named]
    options = [{"type": "object", "properties": {"name": {"const": f.name},
                                                 "arguments": f.parameters},
                "required": ["name", "arguments"], "additionalProperties": False}
               for f in chosen]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    # Not strict: keywords the grammar cannot enforce are left to the schema's own
    # validation, and open objects stay open, as the caller's schema says.
    return common_pb2.Constraint(json_schema=common_pb2.JsonSchema(
        schema=json.dumps(schema), strict=False))


# ---- the prompt ----------------------------------------------------------------------

def involves_tools(messages: Sequence[ChatMessage], tools: Tools | None) -> bool:
    """The conversation shows the model functions, calls or their results."""
    return tools is not None or any(m.tool_calls or m.role == "tool" for m in messages)


def template_request(model: str, messages: Sequence[ChatMessage], tools: Tools | None, *,
                     template_takes_tools: bool) -> tokenizer_pb2.ChatTemplateRequest:
    """The tokenizer's request for the conversation (``tools``: the functions shown to the
    model, None for none): through the template's own tools argument and messages when
    ``template_takes_tools``, else in the system-prompt format."""
    request = tokenizer_pb2.ChatTemplateRequest(model=model, add_generation_prompt=True)
    if template_takes_tools:
        request.messages.extend(tokenizer_pb2.ChatMessage(
            role=m.role, content=m.content, tool_call_id=m.tool_call_id,
            tool_calls=[common_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments)
                        for c in m.tool_calls]) for m in messages)
        if tools is not None and tools.is_shown:
            request.tools.extend(common_pb2.Tool(
                name=f.name, description=f.description, parameters=json.dumps(f.parameters))
                for f in tools.functions)
    else:
        request.messages.extend(tokenizer_pb2.ChatMessage(role=m.role, content=m.content)
                                for m in fallback_messages(messages, tools))
    return request


def system_prompt(tools: Tools) -> str:
    specs = "\n".join(json.dumps(f.spec(), separators=(", ", ": ")) for f in tools.functions)
    return ("You are a function calling AI model. You may call one or more functions to "
            "assist with the user query. Don't make assumptions about what values to plug "
            "into functions. Here are the available tools:\n"
            f"<tools>\n{specs}\n</tools>\n"
            "For each function call, return a JSON object with the function name and "
            "arguments within <tool_call></tool_call> tags:\n"
            f'{OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CLOSE}')


def fallback_messages(messages: Sequence[ChatMessage], tools: Tools | None
                      ) -> list[ChatMessage]:
    """The conversation as plain system, user and assistant messages, for a template
    that knows no tools: the functions' description joined to the system message (or as
    its own), calls and results written as text."""
    out: list[ChatMessage] = []
    for m in messages:
        if m.role == "tool":
            result = f"<tool_response>\n{m.content}\n</tool_response>"
            if out and out[-1].role == "user" and out[-1].content.endswith("</tool_response>"):
                # The results of one turn's calls together.
                out[-1] = ChatMessage("user", f"{out[-1].content}\n{result}")
            else:
                out.append(ChatMessage("user", result))
            continue
        content = m.content
        for call in m.tool_calls:
            text = json.dumps({"name": call.name, "arguments": _arguments(call.arguments)})
            content += f"{OPEN}\n{text}\n{CLOSE}"
        out.append(ChatMessage(m.role, content))
    if tools is not None and tools.is_shown:
        prompt = system_prompt(tools)
        if out and out[0].role == "system":
            out[0] = ChatMessage("system", f"{out[0].content}\n\n{prompt}")
        else:
            out.insert(0, ChatMessage("system", prompt))
    return out


# ---- the output ----------------------------------------------------------------------

def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def calls_in(text: str, tools: Tools) -> tuple[str, list[common_pb2.ToolCall]]:
    """(text, calls) of a whole generated text: with a forced choice the text is the
    JSON of one call; with auto, every ``<tool_call>`` that parses as a declared
    function's call is a call, and the text around the calls is the text."""
    if tools.is_forced:
        call = _call(text, tools)
        return ("", [call]) if call is not None else (text, [])
    content, calls, rest = [], [], text
    while (start := rest.find(OPEN)) >= 0:
        end = rest.find(CLOSE, start)
        body = rest[start + len(OPEN):end if end >= 0 else len(rest)]
        call = _call(body, tools)
        if call is None:
            content.append(rest[:end + len(CLOSE) if end >= 0 else len(rest)])
        else:
            content.append(rest[:start])
            calls.append(call)
        rest = rest[end + len(CLOSE):] if end >= 0 else ""
    content.append(rest)
    return "".join(content).strip() if calls else "".join(content), calls


def _call(text: str, tools: Tools) -> common_pb2.ToolCall | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if obj["name"] not in {f.name for f in tools.functions}:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, dict):
        return None
    return common_pb2.ToolCall(id=new_call_id(), name=obj["name"], arguments=json.dumps(args))


class StreamedCalls:
    """One streamed choice's text with tools: what may stream as text now, and the calls
    once the generation ended."""

    def __init__(self, tools: Tools) -> None:
        self.tools = tools
        self.text = ""  # everything generated
        self.num_released = 0  # characters of it streamed as text

    def feed(self, text: str) -> str:
        """Text that can stream now: nothing with a forced choice; with auto, the text
        before any ``<tool_call>`` (and before a partial one at the end)."""
        self.text += text
        if self.tools.is_forced:
            return ""
        start = self.text.find(OPEN)
        if start < 0:
            start = len(self.text)
            for k in range(min(len(OPEN) - 1, len(self.text)), 0, -1):
                if self.text.endswith(OPEN[:k]):
                    start = len(self.text) - k
                    break
        if start <= self.num_released:
            return ""
        out = self.text[self.num_released:start]
        self.num_released = start
        return out

    def finish(self) -> tuple[str, list[common_pb2.ToolCall]]:
        """(text not streamed yet, calls) at the end of the generation."""
        held = self.text[self.num_released:]
        content, calls = calls_in(held, self.tools)
        return (content if calls else held), calls


class _ChoiceCalls:
    """One choice's text through a StreamedCalls, its tokens' logprobs with it: released
    with the text they end in; those of text that became calls are not reported."""

    def __init__(self, tools: Tools) -> None:
        self.calls = StreamedCalls(tools)
        self.ledger = LogprobLedger()

    def feed(self, chunk: TextChunk) -> TextChunk | None:
        self.ledger.read(chunk)
        text = self.calls.feed(chunk.text)
        if not text:
            return None
        return TextChunk(text, logprobs=self.ledger.release(len(text)), index=chunk.index)

    def finish(self, finished: Finished) -> tuple[TextChunk | None, Finished]:
        rest, calls = self.calls.finish()
        chunk = None if not rest else TextChunk(
            rest, is_final=True, index=finished.index,
            logprobs=() if calls else self.ledger.release(len(rest)))
        return chunk, dataclasses.replace(finished, tool_calls=tuple(calls))


async def with_tool_calls(events: AsyncGenerator[Event, None], tools: Tools
                          ) -> AsyncGenerator[Event, None]:
    """A pipeline run's events with each choice's calls parsed out of its text: the text
    as the module says, and the calls on the choice's Finished."""
    choices: dict[int, _ChoiceCalls] = {}
    async with contextlib.aclosing(events):
        async for event in events:
            if type(event) is TextChunk:
                choice = choices.setdefault(event.index, _ChoiceCalls(tools))
                chunk = choice.feed(event)
                if chunk is not None:
                    yield chunk
            elif type(event) is Finished:
                # A choice that finished without text has no parser yet.
                rest, finished = choices.pop(event.index, _ChoiceCalls(tools)).finish(event)
                if rest is not None:
                    yield rest
                yield finished
            else:
                yield event
