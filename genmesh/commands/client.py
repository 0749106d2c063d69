"""`genmesh chat` and `genmesh generate`: talk to a running mesh through its edge."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator

from genmesh.client import ChatError, Client, GenmeshError, TextDelta, TurnFinished
from genmesh.client.sync import DEFAULT_ADDRESS, ChatSession
from genmesh.client.types import API_KEY_ENV, DEV_API_KEY


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="the mesh's edge (Envoy)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV, DEV_API_KEY),
                   help=f"your tenant's key (default: ${API_KEY_ENV}, else the local dev key)")
    p.add_argument("--model", default="", help="empty: the deployment's default model")
    p.add_argument("--model-version", default="")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate past end tokens")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per call")


def register(sub: argparse._SubParsersAction) -> None:
    chat = sub.add_parser("chat", help="chat with the mesh (Ctrl-C cancels the running turn)")
    _common(chat)
    chat.add_argument("--system", default="", help="a system prompt for the session")
    chat.add_argument("message", nargs="*",
                      help="messages to send as turns; none: read turns from the terminal")
    chat.set_defaults(func=_chat)
    gen = sub.add_parser("generate", help="complete a prompt, streaming to stdout")
    _common(gen)
    gen.add_argument("prompt")
    gen.set_defaults(func=_generate)


def _params(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


def _generate(args: argparse.Namespace) -> int:
    with Client(args.address, timeout_s=args.timeout, api_key=args.api_key) as client:
        try:
            for chunk in client.generate_stream(args.prompt, model=args.model,
                                                model_version=args.model_version,
                                                **_params(args)):
                print(chunk.text, end="", flush=True)
                if chunk.usage is not None:
                    print(f"\n[{_finish(chunk.finish_reason, chunk.finish_detail)}: "
                          f"{chunk.usage.prompt_tokens} prompt + "
                          f"{chunk.usage.completion_tokens} completion tokens]", file=sys.stderr)
        except GenmeshError as exc:
            print(f"\ngenmesh: {exc}", file=sys.stderr)
            return 1
    return 0


def _chat(args: argparse.Namespace) -> int:
    interactive = not args.message
    with Client(args.address, timeout_s=args.timeout, api_key=args.api_key) as client, client.chat(
            model=args.model, model_version=args.model_version, system_prompt=args.system,
            **_params(args)) as session:
        turns = iter(args.message) if args.message else _read_turns()
        return run_turns(session, turns, echo=not interactive, stop_on_error=not interactive)


def run_turns(session: ChatSession, turns: Iterable[str], *, echo: bool,
              stop_on_error: bool) -> int:
    """Runs the turns in order, streaming each answer; the exit status for the CLI."""
    for content in turns:
        if echo:
            print(f"\n> {content}", file=sys.stderr)
        try:
            if not run_turn(session, content):
                return 1
        except GenmeshError as exc:
            print(f"genmesh: {exc}", file=sys.stderr)
            if stop_on_error:
                return 1
    return 0


def _read_turns() -> Iterator[str]:
    print("chat: type a message; Ctrl-C cancels a running answer, Ctrl-D quits",
          file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if line.strip():
            yield line


def run_turn(session: ChatSession, content: str) -> bool:
    """Streams one turn's answer to stdout; Ctrl-C cancels it. False if the session broke."""
    session.start_turn(content)
    cancelled = False

    def cancel_once() -> None:
        nonlocal cancelled
        if not cancelled:
            session.cancel()
            cancelled = True

    while True:
        try:
            event = session.next_event()
        except KeyboardInterrupt:
            cancel_once()
            continue
        if event is None:
            print("\ngenmesh: the session ended", file=sys.stderr)
            return False
        if isinstance(event, TextDelta):
            try:
                print(event.text, end="", flush=True)
            except KeyboardInterrupt:  # Ctrl-C while printing counts too
                cancel_once()
        elif isinstance(event, TurnFinished):
            u = event.usage
            replayed = "; replayed from the response cache" if u.response_cached else ""
            print(f"\n[{_finish(event.finish_reason, event.finish_detail)}: {u.prompt_tokens} "
                  f"prompt ({u.cached_prompt_tokens}"
                  f" cached) + {u.completion_tokens} completion tokens{replayed}]",
                  file=sys.stderr)
            return True
        elif isinstance(event, ChatError):
            raise GenmeshError(event.code, event.message)


def _finish(reason: str | None, detail: str) -> str:
    """"stop", or "content_filter (violence)" when the reason has a detail."""
    return f"{reason} ({detail})" if detail else str(reason)
