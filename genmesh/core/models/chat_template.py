"""Render a model's chat template (Jinja, as stored in its HF folder) into a prompt."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system", "user" or "assistant"
    content: str


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
        # Templates come with model files: render them sandboxed.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            undefined=jinja2.StrictUndefined)
        env.globals["raise_exception"] = _raise_exception  # HF templates reject input so
        self._template = env.from_string(source)

    def render(self, messages: list[ChatMessage], *, add_generation_prompt: bool = True) -> str:
        return self._template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
        )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)
