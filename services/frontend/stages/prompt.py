"""The prompt stage: the prompt's token ids (the tokenizer service tokenizes a raw prompt
or renders a chat template), and with a safety service the prompt check beside them.
A chat with tools, calls or their results is rendered as ``tools.template_request`` says,
by whether the model's template takes tools (asked of the tokenizer once per model).

``Tokenize`` is the stage of a deployment without a safety service; ``TokenizeAndCheck``
of one with it. The check and the tokenization run together: a blocked prompt never
reaches a worker or a budget, and a redacted prompt replaces the original and is
tokenized again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

import grpc

from genmesh.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.frontend.errors import PipelineError, rpc_error
from services.frontend.moderation import SafetyGate
from services.frontend.stages.call import Call, Next, StageEvent
from services.frontend.tools import involves_tools, template_request

if TYPE_CHECKING:
    from services.frontend.pipeline import PipelineRequest


class Tokenize:
    def __init__(self, tokenizer: tokenizer_pb2_grpc.TokenizerStub, *, rpc_timeout_s: float
                 ) -> None:
        self.tokenizer = tokenizer
        self.rpc_timeout_s = rpc_timeout_s  # deadline of each Tokenize call
        # Per model: its chat template takes tools (a fact of its files, asked once).
        self.takes_tools: dict[str, bool] = {}

    async def run(self, call: Call, rest: Next) -> AsyncGenerator[StageEvent, None]:
        call.req, prompt_ids = await self.checked(call)
        if not prompt_ids:
            raise PipelineError(grpc.StatusCode.INVALID_ARGUMENT, "the prompt has no tokens")
        call.prompt_ids = prompt_ids
        call.tokens.num_prompt = len(prompt_ids)
        async with contextlib.aclosing(rest(call)) as events:
            async for event in events:
                yield event

    async def checked(self, call: Call) -> tuple[PipelineRequest, list[int]]:
        """The request as it may go to the model, and its token ids."""
        return call.req, await self.traced_ids(call, call.req)

    async def traced_ids(self, call: Call, req: PipelineRequest) -> list[int]:
        with call.observer.stage("tokenize"):
            return await self.ids(req)

    async def ids(self, req: PipelineRequest) -> list[int]:
        try:
            if req.prompt is not None:
                reply = await self.tokenizer.Tokenize(tokenizer_pb2.TokenizeRequest(
                    model=req.model, text=req.prompt, add_special_tokens=True),
                    timeout=self.rpc_timeout_s)
            else:
                takes_tools = (involves_tools(req.messages, req.tools)
                               and await self._takes_tools(req.model))
                reply = await self.tokenizer.ApplyChatTemplate(template_request(
                    req.model, req.messages, req.tools, template_takes_tools=takes_tools),
                    timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, "tokenizer") from None
        return list(reply.token_ids)

    async def _takes_tools(self, model: str) -> bool:
        if model not in self.takes_tools:
            described = await self.tokenizer.DescribeModel(
                tokenizer_pb2.DescribeModelRequest(model=model), timeout=self.rpc_timeout_s)
            self.takes_tools[model] = described.supports_tools
        return self.takes_tools[model]


class TokenizeAndCheck(Tokenize):
    def __init__(self, tokenizer: tokenizer_pb2_grpc.TokenizerStub, safety: SafetyGate, *,
                 rpc_timeout_s: float) -> None:
        super().__init__(tokenizer, rpc_timeout_s=rpc_timeout_s)
        self.safety = safety

    async def checked(self, call: Call) -> tuple[PipelineRequest, list[int]]:
        req = call.req
        tokenizing = asyncio.ensure_future(self.traced_ids(call, req))
        try:
            with call.observer.stage("prompt_check"):
                checked = await self._check(req)
            if checked == req:
                return req, await tokenizing
        finally:
            tokenizing.cancel()  # blocked or redacted: its ids are not needed (no-op if done)
            await asyncio.gather(tokenizing, return_exceptions=True)
        return checked, await self.traced_ids(call, checked)

    async def _check(self, req: PipelineRequest) -> PipelineRequest:
        if req.prompt is not None:
            text = await self.safety.check_text(req.prompt, request_id=req.request_id,
                                                tenant=req.tenant, model=req.model)
            return req if text == req.prompt else dataclasses.replace(req, prompt=text)
        messages = await self.safety.check_messages(
            req.messages, first=req.num_checked_messages, request_id=req.request_id,
            tenant=req.tenant, model=req.model)
        return req if messages == req.messages else dataclasses.replace(req, messages=messages)
