from __future__ import annotations

import json
from typing import Any

from genmesh.core.models.chat_template import ChatMessage, ChatTemplate, load_chat_template


def test_rendering_matches_transformers_apply_chat_template(model_dir):
    from transformers import AutoTokenizer

    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi!"),
                ChatMessage("assistant", "Hello."), ChatMessage("user", "Why is the sky blue?")]
    template = load_chat_template(model_dir)
    assert template is not None
    ours = ChatTemplate(template).render(messages)
    hf = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages], tokenize=False,
        add_generation_prompt=True)
    assert ours == hf
    assert ours.endswith("<|im_start|>assistant\n")


def test_a_tool_template_renders_as_transformers_renders_it(model_dir):
    """Tools, calls and results reach a template that names `tools` as they reach it in
    transformers (lenient undefined, plain `tojson`)."""
    from transformers import AutoTokenizer

    from tests.services.frontend.test_tools import HISTORY, WITH_TOOLS

    tools: list[Any] = [{"type": "function", "function": {
        "name": "get_weather", "description": "The <weather> & more.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    template = ChatTemplate(WITH_TOOLS)
    assert template.supports_tools
    ours = template.render(list(HISTORY), tools=tools)
    messages: list[Any] = [
        {"role": m.role, "content": m.content}
        | ({"tool_calls": [{"id": c.id, "type": "function", "function": {
            "name": c.name, "arguments": json.loads(c.arguments)}} for c in m.tool_calls]}
           if m.tool_calls else {})
        | ({"tool_call_id": m.tool_call_id} if m.tool_call_id else {}) for m in HISTORY]
    hf = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        messages, tools=tools, chat_template=WITH_TOOLS, tokenize=False,
        add_generation_prompt=True)
    assert ours == hf
    assert '"description": "The <weather> & more."' in ours
