from __future__ import annotations

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
