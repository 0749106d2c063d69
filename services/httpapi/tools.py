"""Tool calls (OpenAI's ``tools`` and ``tool_choice``) over a model that generates text.

The functions are described to the model in a system message, in the format Hermes- and
Qwen-style chat templates use: the functions' JSON inside ``<tools></tools>``, and each
call the model makes as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
Results come back as ``tool`` messages, rendered as ``<tool_response>`` in a user turn;
an assistant turn that called tools is rendered with its calls.

- ``auto``: the model chooses. Its text streams as content until a ``<tool_call>`` opens
  (a partial opening tag at the end of the text is held back); the calls are parsed when
  the generation ends. A call that does not parse stays content.
- ``required`` and a named function: the output is enforced by the grammar engine as one
  JSON object ``{"name": <a declared function>, "arguments": <its parameters>}``, so the
  call always names a declared function and its arguments always validate against that
  function's schema.
- ``none``: the functions are not shown to the model.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from genmesh.v1 import common_pb2, generation_pb2
from services.httpapi.errors import invalid

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_TOOLS = 128


@dataclass(frozen=True, slots=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON Schema of the arguments object

    def spec(self) -> dict[str, Any]:
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": self.parameters}}


class Mode(StrEnum):
    AUTO = "auto"
    NONE = "none"
    REQUIRED = "required"
    NAMED = "named"  # one function, named in tool_choice


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


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {"id": self.id, "type": "function",
                                "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index} | call


def parse_tools(tools: Any, tool_choice: Any) -> Tools | None:
    """The request's ``tools`` and ``tool_choice``; None when it declares no tools."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise invalid("'tool_choice' needs 'tools'", param="tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise invalid(f"'tools' must be a list of at most {MAX_TOOLS} tools", param="tools")
    functions = tuple(_function(t, i) for i, t in enumerate(tools))
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise invalid("'tools' declares the same function name twice", param="tools")
    if tool_choice is None or tool_choice == "auto":
        return Tools(functions, Mode.AUTO)
    if tool_choice == "none":
        return Tools(functions, Mode.NONE)
    if tool_choice == "required":
        return Tools(functions, Mode.REQUIRED)
    if (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
            and isinstance(tool_choice.get("function"), dict)):
        name = tool_choice["function"].get("name")
        if name not in names:
            raise invalid(f"'tool_choice' names {name!r}, which 'tools' does not declare",
                          param="tool_choice")
        return Tools(functions, Mode.NAMED, named=name)
    raise invalid("'tool_choice' must be none, auto, required or "
                  "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")


def _function(tool: Any, i: int) -> Function:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(
            tool.get("function"), dict):
        raise invalid(f"'{where}' must be {{\"type\": \"function\", \"function\": {{...}}}}",
                      param=where)
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not name or len(name) > 64 or not all(
            c.isalnum() or c in "_-" for c in name):
        raise invalid(f"'{where}.function.name' must be 1-64 letters, digits, _ or -",
                      param=where)
    parameters = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise invalid(f"'{where}.function.parameters' must be a JSON Schema object",
                      param=where)
    description = fn.get("description", "")
    if not isinstance(description, str):
        raise invalid(f"'{where}.function.description' must be a string", param=where)
    return Function(name, description, parameters)


# ---- the prompt ---------------------------------------------------------------------

def system_prompt(tools: Tools) -> str:
    specs = "\n".join(json.dumps(f.spec(), separators=(", ", ": ")) for f in tools.functions)
    return ("You are a function calling AI model. You may call one or more functions to "
            "assist with the user query. Don't make assumptions about what values to plug "
            "into functions. Here are the available tools:\n"
            f"<tools>\n{specs}\n</tools>\n"
            "For each function call, return a JSON object with the function name and "
            "arguments within <tool_call></tool_call> tags:\n"
            f'{OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CLOSE}')


def messages_with_tools(messages: Sequence[Any], tools: Tools | None
                        ) -> list[generation_pb2.Message]:
    """The conversation as the model reads it: the tools' description joined to the
    system message (or as its own), assistant calls and tool results rendered as text.
    ``messages`` are the request's raw (validated) message objects."""
    out: list[generation_pb2.Message] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            content = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].role == "user" and out[-1].content.endswith("</tool_response>"):
                out[-1].content += "\n" + content  # the results of one turn's calls together
                continue
            out.append(generation_pb2.Message(role="user", content=content))
            continue
        for call in m.get("tool_calls") or ():
            fn = call["function"]
            args = fn.get("arguments", "{}")
            text = json.dumps({"name": fn["name"], "arguments": json.loads(args)})
            content += f"{OPEN}\n{text}\n{CLOSE}"
        out.append(generation_pb2.Message(role="system" if role == "developer" else role,
                                          content=content))
    if tools is not None and tools.is_shown:
        prompt = system_prompt(tools)
        if out and out[0].role == "system":
            out[0].content = f"{out[0].content}\n\n{prompt}"
        else:
            out.insert(0, generation_pb2.Message(role="system", content=prompt))
    return out


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


# ---- the output ---------------------------------------------------------------------

def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def calls_in(text: str, tools: Tools) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole generated text: with a forced choice the text is the
    JSON of one call; with auto, every ``<tool_call>`` that parses as a declared
    function's call is a call, and the text around the calls is the content."""
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


def _call(text: str, tools: Tools) -> ToolCall | None:
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
    return ToolCall(new_call_id(), obj["name"], json.dumps(args))


class StreamedCalls:
    """One streamed choice's text with tools: what may stream as content now, and the
    calls once the generation ended."""

    def __init__(self, tools: Tools) -> None:
        self.tools = tools
        self.text = ""  # everything generated
        self.num_released = 0  # characters of it streamed as content

    def feed(self, text: str) -> str:
        """Content that can stream now: nothing with a forced choice; with auto, the
        text before any ``<tool_call>`` (and before a partial one at the end)."""
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

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not streamed yet, calls) at the end of the generation."""
        held = self.text[self.num_released:]
        content, calls = calls_in(held, self.tools)
        return (content if calls else held), calls
