"""`genmesh engine chat|generate`: run the native engine in this process (no mesh)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from genmesh.core.models.chat_template import ChatMessage, ChatTemplate, load_chat_template
from genmesh.core.models.store import ModelStore, default_store_root
from services.worker.engine.api import create_engine
from services.worker.engine.config import EngineConfig
from services.worker.engine.params import SamplingParams

DEFAULT_MODEL = "smollm2-135m-instruct"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engine", help="run the inference engine in-process")
    esub = p.add_subparsers(dest="engine_command", required=True)
    for name, help_text in (("chat", "one chat turn (applies the chat template)"),
                            ("generate", "complete raw text")):
        c = esub.add_parser(name, help=help_text)
        c.add_argument("prompt")
        c.add_argument("--model", default=DEFAULT_MODEL, help="store name or HF folder")
        c.add_argument("--dtype", default="bfloat16")
        c.add_argument("--max-tokens", type=int, default=128)
        c.add_argument("--temperature", type=float, default=0.0)
        c.add_argument("--top-p", type=float, default=1.0)
        c.add_argument("--seed", type=int, default=None)
        c.set_defaults(func=_run, chat=name == "chat")


def _run(args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    folder = ModelStore(default_store_root()).ensure(args.model)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = args.prompt
    if args.chat:
        template = load_chat_template(folder)
        if template is None:
            raise ValueError(f"model {args.model!r} has no chat template; use `engine generate`")
        text = ChatTemplate(template).render([ChatMessage("user", args.prompt)])
    prompt_ids = tokenizer.encode(text, add_special_tokens=False).ids
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    asyncio.run(_stream(folder, args.dtype, tokenizer, prompt_ids, params))
    return 0


async def _stream(folder: Path, dtype: str, tokenizer, prompt_ids: list[int],
                  params: SamplingParams) -> None:
    engine = create_engine(EngineConfig(model=str(folder), dtype=dtype))
    try:
        output: list[int] = []
        printed = ""
        async for delta in engine.submit(prompt_ids, params):
            output.extend(delta.new_token_ids)
            text = tokenizer.decode(output, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a split UTF-8 character
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
            if delta.usage:
                u = delta.usage
                print(f"\n[{delta.finish_reason.value if delta.finish_reason else ''}: "
                      f"{u.prompt_tokens} prompt + {u.completion_tokens} completion tokens]",
                      file=sys.stderr)
    finally:
        engine.shutdown()
