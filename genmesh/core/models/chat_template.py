"""Render a model's chat template (Jinja, as stored in its HF folder) into a prompt."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call an assistant message made."""

    id: str
    name: str  # the function's name
    arguments: str  # the JSON text of an object


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system", "user", "assistant" or "tool"
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant message's calls
    tool_call_id: str = ""  # a tool message: the call whose result it is


def load_chat_template(folder: Path) -> str | None:
    """The template from ``chat_template.jinja`` or ``tokenizer_config.json``; None if absent."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text()
    config = folder / "tokenizer_config.json"
    if config.exists():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    return None


class ChatTemplate:
    def __init__(self, source: str) -> None:
        # Templates come with model files: render them sandboxed. They are written for
        # transformers' renderer, so this one is configured as it is: jinja's lenient
        # Undefined (tool templates test `message.tool_calls` on messages without calls)
        # and a `tojson` that writes plain JSON (jinja's own escapes <, > and &).
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception  # HF templates reject input so
        env.filters["tojson"] = _tojson
        parsed = env.parse(source)
        # A template that names `tools` describes functions to its model itself.
        self.supports_tools = "tools" in jinja2.meta.find_undeclared_variables(parsed)
        self._template = env.from_string(parsed)

    def render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] = ()) -> str:
        """The conversation as the model reads it. ``tools`` (HF's ``{"type":
        "function", "function": {...}}`` objects) go to a template that supports them;
        ValueError for tools to one that does not, or call arguments that are not the
        JSON text of an object."""
        if tools and not self.supports_tools:
            raise ValueError("this model's chat template does not take tools")
        return self._template.render(
            messages=[_message(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            tools=list(tools) or None,  # as transformers passes it: None without tools
        )


def _message(m: ChatMessage) -> dict[str, Any]:
    """A message as HF templates read it: keys only for what it has."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.name, "arguments": _arguments(c)}} for c in m.tool_calls]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def _arguments(call: ToolCall) -> dict[str, Any]:
    """A call's arguments as an object: templates write them with ``tojson``."""
    try:
        arguments = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise ValueError(f"the arguments of tool call {call.id!r} are not the JSON text of "
                         "an object")
    return arguments


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)
