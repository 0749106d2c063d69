"""The Tokenizer gRPC service: translates protos to tokenizer calls and errors to status
codes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, TypeVar

import grpc
import jinja2

from genmesh.core.models.chat_template import ChatMessage, ToolCall
from genmesh.core.models.detokenizer import IncrementalDetokenizer
from genmesh.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from services.tokenizer import metrics
from services.tokenizer.config import MAX_CHAT_MESSAGES, MAX_TEXT_CHARS
from services.tokenizer.registry import LoadedTokenizer, TokenizerRegistry, UnknownModelError

CHAT_ROLES = ("system", "user", "assistant", "tool")


class OverLimitError(ValueError):
    """A call asks for more than this service's bounds (INVALID_ARGUMENT, naming them)."""


def check_text_size(num_chars: int, *, max_text_chars: int, what: str) -> None:
    """OverLimitError when ``num_chars`` characters (of ``what``) are too many."""
    if num_chars > max_text_chars:
        raise OverLimitError(f"{what} {num_chars} characters; the tokenizer takes at most "
                             f"{max_text_chars} (its --max-text-chars)")


def chat_messages(messages: Sequence[tokenizer_pb2.ChatMessage], *,
                  max_chat_messages: int, max_text_chars: int) -> list[ChatMessage]:
    """The conversation as domain messages; ValueError if empty or a role is unknown,
    OverLimitError if it has too many messages or characters (checked first: nothing is
    converted then)."""
    if len(messages) > max_chat_messages:
        raise OverLimitError(f"the chat has {len(messages)} messages; the tokenizer takes at "
                             f"most {max_chat_messages} (its --max-chat-messages)")
    check_text_size(sum(len(m.content) + sum(len(c.arguments) for c in m.tool_calls)
                        for m in messages), max_text_chars=max_text_chars,
                    what="the chat's messages have")
    converted = [ChatMessage(role=m.role, content=m.content, tool_call_id=m.tool_call_id,
                             tool_calls=tuple(ToolCall(c.id, c.name, c.arguments)
                                              for c in m.tool_calls))
                 for m in messages]
    if not converted:
        raise ValueError("messages is empty: a chat needs at least one message")
    for n, m in enumerate(converted):
        if m.role not in CHAT_ROLES:
            raise ValueError(f"messages[{n}].role is {m.role!r}; "
                             f"expected one of {', '.join(CHAT_ROLES)}")
    return converted


def check_token_ids(token_ids: Iterable[int], t: LoadedTokenizer) -> None:
    """ValueError naming the first id outside the model's vocabulary."""
    for token_id in token_ids:
        if not 0 <= token_id < t.vocab_size:
            raise ValueError(f"token id {token_id} is out of range for model {t.name!r} "
                             f"(vocab size {t.vocab_size})")


class NoChatTemplateError(Exception):
    """The model has no chat template."""


def tool_specs(tools: Sequence[common_pb2.Tool]) -> list[dict[str, Any]]:
    """The functions as a template's ``tools`` argument (HF's shape); ValueError for
    parameters that are not the JSON text of an object."""
    specs = []
    for i, tool in enumerate(tools):
        try:
            parameters = json.loads(tool.parameters) if tool.parameters else {
                "type": "object", "properties": {}}
        except json.JSONDecodeError:
            parameters = None
        if not isinstance(parameters, dict):
            raise ValueError(f"tools[{i}].parameters: must be the JSON text of an object")
        specs.append({"type": "function", "function": {
            "name": tool.name, "description": tool.description, "parameters": parameters}})
    return specs


def apply_chat_template(t: LoadedTokenizer, messages: list[ChatMessage], *,
                        add_generation_prompt: bool, tools: Sequence[dict[str, Any]] = ()
                        ) -> tuple[str, list[int]]:
    """The rendered conversation and its token ids. Raises NoChatTemplateError,
    ValueError (tools for a template without them, bad call arguments), and
    jinja2.TemplateError where the template rejects the messages."""
    if t.chat_template is None:
        raise NoChatTemplateError(f"model {t.name!r} has no chat template; use Tokenize")
    text = t.chat_template.render(messages, add_generation_prompt=add_generation_prompt,
                                  tools=tools)
    # The template writes the special tokens itself: adding them again would double them.
    return text, t.tokenizer.encode(text, add_special_tokens=False).ids


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, registry: TokenizerRegistry, *, max_text_chars: int = MAX_TEXT_CHARS,
                 max_chat_messages: int = MAX_CHAT_MESSAGES) -> None:
        self.registry = registry
        self.max_text_chars = max_text_chars  # TokenizerConfig's bounds of one call
        self.max_chat_messages = max_chat_messages

    async def _get(self, model: str, context: grpc.aio.ServicerContext) -> LoadedTokenizer:
        try:
            return self.registry.get(model)
        except UnknownModelError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            raise  # abort raises; this keeps the type checker informed

    async def Tokenize(self, request: tokenizer_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> tokenizer_pb2.TokenizeResponse:
        metrics.REQUESTS.labels("Tokenize").inc()
        try:
            check_text_size(len(request.text), max_text_chars=self.max_text_chars,
                            what="the text has")
        except OverLimitError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with metrics.LATENCY.labels("Tokenize").time():
            t = await self._get(request.model, context)
            encoding = await _run(len(request.text), t.tokenizer.encode, request.text,
                                  add_special_tokens=request.add_special_tokens)
        return tokenizer_pb2.TokenizeResponse(token_ids=encoding.ids, text=request.text)

    async def ApplyChatTemplate(self, request: tokenizer_pb2.ChatTemplateRequest,
                                context: grpc.aio.ServicerContext
                                ) -> tokenizer_pb2.TokenizeResponse:
        metrics.REQUESTS.labels("ApplyChatTemplate").inc()
        t = await self._get(request.model, context)
        try:
            messages = chat_messages(request.messages, max_chat_messages=self.max_chat_messages,
                                     max_text_chars=self.max_text_chars)
            tools = tool_specs(request.tools)
            with metrics.LATENCY.labels("ApplyChatTemplate").time():
                text, token_ids = await _run(
                    sum(len(m.content) for m in messages), apply_chat_template, t, messages,
                    add_generation_prompt=request.add_generation_prompt, tools=tools)
        except NoChatTemplateError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except jinja2.TemplateError as exc:  # includes the template's raise_exception
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"model {t.name!r}'s chat template rejected the messages: {exc}")
        return tokenizer_pb2.TokenizeResponse(token_ids=token_ids, text=text)

    async def Detokenize(self, request_iterator: AsyncIterator[tokenizer_pb2.DetokenizeRequest],
                         context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[tokenizer_pb2.DetokenizeResponse]:
        # Per message the work is two decodes of a few tokens (microseconds), so it runs
        # on the event loop; one response per request lets the caller pair them.
        t: LoadedTokenizer | None = None
        detokenizer: IncrementalDetokenizer | None = None
        async for request in request_iterator:
            if t is None or detokenizer is None:
                if not request.model:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        "the first Detokenize message must name the model")
                t = await self._get(request.model, context)
                detokenizer = IncrementalDetokenizer(
                    t.tokenizer, skip_special_tokens=request.skip_special_tokens)
            metrics.REQUESTS.labels("Detokenize").inc()
            try:
                check_token_ids(request.token_ids, t)
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            with metrics.LATENCY.labels("Detokenize").time():
                text = detokenizer.push(request.token_ids)
                if request.flush:
                    text += detokenizer.flush()
            yield tokenizer_pb2.DetokenizeResponse(text=text)

    async def DescribeModel(self, request: tokenizer_pb2.DescribeModelRequest,
                            context: grpc.aio.ServicerContext
                            ) -> tokenizer_pb2.ModelDescription:
        t = await self._get(request.model, context)
        return tokenizer_pb2.ModelDescription(
            model=t.name, vocab_size=t.vocab_size,
            has_chat_template=t.chat_template is not None, eos_token_ids=t.eos_token_ids,
            supports_tools=t.chat_template is not None and t.chat_template.supports_tools)


T = TypeVar("T")

# Below this many characters, tokenizing takes tens of microseconds: less than a hop to a
# thread and back. Longer inputs take milliseconds, and Detokenize streams share the loop.
INLINE_MAX_CHARS = 4096


async def _run(num_chars: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    if num_chars <= INLINE_MAX_CHARS:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)
