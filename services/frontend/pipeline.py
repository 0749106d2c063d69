"""The generation pipeline: tokenize (or render the chat template) → worker stream of
token ids → incremental detokenize (in-process, ``detokenize.py``) → stop strings →
output moderation (pipelined) → usage.

The prompt check (``moderation.py``) runs beside tokenization; a redacted prompt is
tokenized again, a blocked one never reaches a worker or a budget. Output moderation runs
after the stop strings, on the text the client would see. The response cache
(``response_cache.py``) slots in between tokenize and generate: a deterministic request
asks the gateway which version serves it, looks its answer up (or waits for an identical
request in flight), and otherwise stores what it generated. Every downstream
call carries a deadline; every downstream stream is cancelled when the caller goes away,
which frees the worker's KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from genmesh.models.chat_template import ChatMessage
from genmesh.v1 import (
    cache_pb2,
    common_pb2,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from services.common import metadata
from services.common.sampling import DEFAULT_MAX_TOKENS
from services.common.telemetry import trace_metadata
from services.frontend import metrics
from services.frontend.detokenize import Detokenizers, Detokenizing, RemoteDetokenizers
from services.frontend.errors import PipelineError, rpc_error
from services.frontend.events import Event, Finished, Started, TextChunk
from services.frontend.moderation import OutputModeration, Piece, SafetyGate
from services.frontend.observe import RequestObserver, tracer
from services.frontend.response_cache import ResponseCache, cache_key, is_cacheable
from services.frontend.routing import Affinity, ab_bucket, prefix_key
from services.frontend.stops import StopMatcher, validate_stop_strings

if TYPE_CHECKING:
    from services.frontend.admission import Admission

log = logging.getLogger("genmesh.frontend")

@dataclass(frozen=True, slots=True)
class PipelineRequest:
    request_id: str
    model: str  # resolved model name (never empty)
    model_version: str  # a pinned version, or "" to let the gateway route
    prompt: str | None  # raw text to complete, or None for a chat
    messages: tuple[ChatMessage, ...]  # the conversation when prompt is None
    params: common_pb2.SamplingParams
    priority: common_pb2.Priority = common_pb2.PRIORITY_NORMAL
    tenant: str = ""  # from the gateway; isolates the worker's prefix cache and budgets
    # messages[:num_checked_messages] passed the prompt check before (a chat's history)
    num_checked_messages: int = 0
    skip_cache: bool = False  # never answer from, or store into, the response cache
    # The public call it serves (Generate, GenerateStream, Chat, GenerateBatch, Job): a
    # label of the request metrics.
    method: str = "Generate"
    # model_version was chosen by the rollout's split (not pinned by the caller): the
    # worker call goes to it the way a split call would, mirror included.
    is_version_routed: bool = False




@dataclass(slots=True)
class _Generated:
    num_tokens: int = 0  # tokens the worker has generated for the request so far


@dataclass(slots=True)
class _Ending:
    """How the worker stream finished; set with the final piece."""

    finish_reason: common_pb2.FinishReason = common_pb2.FINISH_REASON_UNSPECIFIED
    # The worker's usage, or the tokens counted up to a stop string.
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)


@dataclass(slots=True)
class _Caching:
    """A request whose answer goes into the response cache once it finishes."""

    key: cache_pb2.CacheKey
    lease_id: str  # empty: no lease (the cache was down, or the wait ran out)
    chunks: list[str] = field(default_factory=list)  # the text as streamed
    is_done: bool = False  # stored (or not worth storing): nothing to release


class Pipeline:
    def __init__(self, *, tokenizer: tokenizer_pb2_grpc.TokenizerStub,
                 worker: worker_pb2_grpc.WorkerStub, rpc_timeout_s: float,
                 detokenizers: Detokenizers | None = None,
                 admission: Admission | None = None, affinity: Affinity | None = None,
                 safety: SafetyGate | None = None, cache: ResponseCache | None = None
                 ) -> None:
        self.tokenizer = tokenizer
        # Chosen once at start-up (detokenize.choose); None: the tokenizer service's stream.
        self.detokenizers = detokenizers or RemoteDetokenizers(tokenizer)
        self.safety = safety  # None: no prompt checks, no output moderation
        self.worker = worker
        self.rpc_timeout_s = rpc_timeout_s
        self.admission = admission  # None: no token budgets
        self.affinity = affinity or Affinity()
        self.cache = cache  # None: no response cache

    async def prompt_ids(self, req: PipelineRequest) -> list[int]:
        try:
            if req.prompt is not None:
                reply = await self.tokenizer.Tokenize(tokenizer_pb2.TokenizeRequest(
                    model=req.model, text=req.prompt, add_special_tokens=True),
                    timeout=self.rpc_timeout_s)
            else:
                reply = await self.tokenizer.ApplyChatTemplate(tokenizer_pb2.ChatTemplateRequest(
                    model=req.model, add_generation_prompt=True,
                    messages=[tokenizer_pb2.ChatMessage(role=m.role, content=m.content)
                              for m in req.messages]), timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, "tokenizer") from None
        return list(reply.token_ids)

    async def run(self, req: PipelineRequest, *, timeout_s: float
                  ) -> AsyncGenerator[Event, None]:
        """Streams Started, then TextChunks, then Finished; raises PipelineError."""
        observer = RequestObserver(req)
        try:
            async for event in self._run(req, observer, timeout_s=timeout_s):
                observer.see(event)
                yield event
        except PipelineError as exc:
            observer.failed(exc.code.name)
            raise
        finally:
            observer.close()

    async def _run(self, req: PipelineRequest, observer: RequestObserver, *, timeout_s: float
                   ) -> AsyncGenerator[Event, None]:
        error = validate_stop_strings(list(req.params.stop))
        if error:
            raise PipelineError(grpc.StatusCode.INVALID_ARGUMENT, error)
        req, prompt_ids = await self._checked_prompt(req, observer)
        if not prompt_ids:
            raise PipelineError(grpc.StatusCode.INVALID_ARGUMENT, "the prompt has no tokens")
        caching = None
        if self.cache is not None and not req.skip_cache and is_cacheable(req.params):
            with observer.stage("cache_lookup"):
                if not req.model_version:
                    req = dataclasses.replace(req, model_version=await self._routed_version(
                        req, prompt_ids), is_version_routed=True)
                key = cache_key(tenant=req.tenant, model=req.model, version=req.model_version,
                                prompt_ids=prompt_ids, params=req.params)
                found = await self.cache.lookup(key, deadline_s=timeout_s)
            if found.answer is not None:
                # A replay: no inference, no budget.
                for event in _replay(req, len(prompt_ids), found.answer):
                    yield event
                return
            caching = _Caching(key, found.lease_id)
        # A negative max_tokens is refused by the worker (INVALID_ARGUMENT), after which
        # the reservation is refunded.
        max_tokens = max(req.params.max_tokens or DEFAULT_MAX_TOKENS, 0)
        reservation = None
        generated = _Generated()
        try:
            if self.admission is not None:
                with observer.stage("budget"):
                    reservation = await self.admission.reserve(req.tenant,
                                                               len(prompt_ids) + max_tokens)
            async for event in self._generate(req, prompt_ids, generated, observer,
                                              timeout_s=timeout_s):
                if caching is not None:
                    await self._keep(caching, event)
                yield event
        finally:
            if caching is not None and caching.lease_id and not caching.is_done:
                assert self.cache is not None
                self.cache.release_soon(caching.key, caching.lease_id)
            if reservation is not None:
                # Refund what the request did not use, however it ended.
                num_used = len(prompt_ids) + generated.num_tokens
                await reservation.settle(num_used)
                if reservation.is_reserved:
                    metrics.BUDGET_USED.labels(req.tenant).inc(num_used)

    async def _keep(self, caching: _Caching, event: Event) -> None:
        """Collect the answer; on a complete finish, store it (before the client hears of
        the finish, so that a caller who repeats the request at once finds it)."""
        assert self.cache is not None
        if isinstance(event, TextChunk):
            caching.chunks.append(event.text)
        elif isinstance(event, Finished):
            caching.is_done = True
            if event.finish_reason in (common_pb2.FINISH_REASON_STOP,
                                       common_pb2.FINISH_REASON_LENGTH):
                text = "".join(caching.chunks)
                with tracer.start_as_current_span("cache_store"):
                    await self.cache.store(caching.key, cache_pb2.CachedAnswer(
                        text=text, finish_reason=event.finish_reason, usage=event.usage,
                        text_chunks=caching.chunks), lease_id=caching.lease_id)
            elif caching.lease_id:
                self.cache.release_soon(caching.key, caching.lease_id)

    async def _routed_version(self, req: PipelineRequest, prompt_ids: list[int]) -> str:
        """The version the rollout's split picks for this request: a stats call through
        the same route and headers as Generate answers with the version it reached."""
        try:
            stats = await self.worker.GetStats(
                worker_pb2.GetStatsRequest(), timeout=self.rpc_timeout_s,
                metadata=self._worker_metadata(req, prompt_ids))
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, "worker") from None
        return stats.model_version

    async def _checked_prompt(self, req: PipelineRequest, observer: RequestObserver
                              ) -> tuple[PipelineRequest, list[int]]:
        """The request as it may go to the model, and its token ids. The check and the
        tokenization run together; a redacted prompt is tokenized again."""
        async def tokenize(r: PipelineRequest) -> list[int]:
            with observer.stage("tokenize"):
                return await self.prompt_ids(r)

        if self.safety is None:
            return req, await tokenize(req)
        tokenizing = asyncio.ensure_future(tokenize(req))
        try:
            with observer.stage("prompt_check"):
                checked = await self._check(req)
            if checked == req:
                return req, await tokenizing
        finally:
            tokenizing.cancel()  # blocked or redacted: its ids are not needed (no-op if done)
            await asyncio.gather(tokenizing, return_exceptions=True)
        return checked, await tokenize(checked)

    async def _check(self, req: PipelineRequest) -> PipelineRequest:
        assert self.safety is not None
        if req.prompt is not None:
            text = await self.safety.check_text(req.prompt, request_id=req.request_id,
                                                tenant=req.tenant, model=req.model)
            return req if text == req.prompt else dataclasses.replace(req, prompt=text)
        messages = await self.safety.check_messages(
            req.messages, first=req.num_checked_messages, request_id=req.request_id,
            tenant=req.tenant, model=req.model)
        return req if messages == req.messages else dataclasses.replace(req, messages=messages)

    def _worker_metadata(self, req: PipelineRequest, prompt_ids: list[int]
                         ) -> tuple[tuple[str, str], ...]:
        pairs = [(metadata.REQUEST_ID, req.request_id)]
        if req.model_version:
            pairs.append((metadata.ROUTED_VERSION if req.is_version_routed
                          else metadata.MODEL_VERSION, req.model_version))
        key = prefix_key(req.tenant, prompt_ids, block_size=self.affinity.block_size,
                         max_blocks=self.affinity.max_blocks)
        if key is not None:
            pairs.append((metadata.PREFIX_KEY, key))
        bucket = ab_bucket(req.tenant)
        if bucket is not None:
            pairs.append((metadata.AB_BUCKET, bucket))
        return tuple(pairs)

    async def _generate(self, req: PipelineRequest, prompt_ids: list[int],
                        generated: _Generated, observer: RequestObserver, *, timeout_s: float
                        ) -> AsyncGenerator[Event, None]:
        """The worker stream, detokenized and cut at stop strings; counts the tokens
        generated into ``generated`` as they arrive."""
        with observer.stage("generate"):
            async for event in self._stream(req, prompt_ids, generated, observer,
                                            timeout_s=timeout_s):
                yield event

    async def _stream(self, req: PipelineRequest, prompt_ids: list[int],
                      generated: _Generated, observer: RequestObserver, *, timeout_s: float
                      ) -> AsyncGenerator[Event, None]:
        worker_params = common_pb2.SamplingParams()
        worker_params.CopyFrom(req.params)
        del worker_params.stop[:]  # stop strings are applied here, on text
        worker_call = self.worker.Generate(worker_pb2.WorkerGenerateRequest(
            # The worker's id must be unique even when callers reuse theirs.
            request_id=f"{req.request_id}.{secrets.token_hex(3)}", prompt_ids=prompt_ids,
            params=worker_params, priority=req.priority, cache_salt=req.tenant),
            timeout=timeout_s, metadata=self._worker_metadata(req, prompt_ids)
            + trace_metadata())
        detok = self.detokenizers.open(req.model, timeout_s=timeout_s)
        moderation = (OutputModeration(None) if self.safety is None
                      else self.safety.moderation(request_id=req.request_id, tenant=req.tenant))
        ending = _Ending()
        try:
            served = dict(await worker_call.initial_metadata() or ())
            version = str(served.get(metadata.MODEL_VERSION, req.model_version))
            yield Started(req.request_id, req.model, version, len(prompt_ids),
                          req.messages if req.prompt is None else ())
            # Moderation reads the pieces as the worker streams them and hands back what
            # the client may see; with a safety service it runs ahead of its verdicts.
            pieces = self._pieces(req, worker_call, detok, len(prompt_ids), generated,
                                  observer, ending)
            async with contextlib.aclosing(moderation.moderate(
                    pieces, on_verdict=None if self.safety is None
                    else functools.partial(observer.busy, "moderation"))) as moderated:
                async for out in moderated:
                    if out.text:
                        yield TextChunk(out.text)
                    if out.blocked:
                        yield Finished(common_pb2.FINISH_REASON_CONTENT_FILTER,
                                       common_pb2.Usage(prompt_tokens=len(prompt_ids),
                                                        completion_tokens=generated.num_tokens),
                                       detail=out.blocked)
                        return
            yield Finished(ending.finish_reason, ending.usage)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, "worker") from None
        finally:
            # Whatever ended the request (done, stop string, caller gone, error): release
            # the worker's request (and its KV blocks), moderation and detokenizer streams.
            worker_call.cancel()
            moderation.close()
            detok.close()

    async def _pieces(self, req: PipelineRequest, worker_call: AsyncIterator[
                          worker_pb2.WorkerGenerateResponse], detok: Detokenizing,
                      num_prompt_tokens: int, generated: _Generated,
                      observer: RequestObserver, ending: _Ending
                      ) -> AsyncGenerator[Piece, None]:
        """The worker stream as text, cut at stop strings; the last piece is final and
        ``ending`` then says how the generation finished."""
        stops = StopMatcher(list(req.params.stop))
        async for msg in worker_call:
            generated.num_tokens += len(msg.token_ids)
            observer.tokens(len(msg.token_ids))
            if msg.finish_reason == common_pb2.FINISH_REASON_ERROR:
                raise PipelineError(grpc.StatusCode.INTERNAL, f"generation failed: {msg.error}")
            start_ns = time.time_ns()
            text = await detok.text(msg.token_ids, final=bool(msg.finish_reason))
            observer.busy("detokenize", start_ns, time.time_ns())
            cut = stops.feed(text)
            if cut.is_stopped:
                ending.finish_reason = common_pb2.FINISH_REASON_STOP
                ending.usage = common_pb2.Usage(prompt_tokens=num_prompt_tokens,
                                                completion_tokens=generated.num_tokens)
                yield Piece(cut.text, is_final=True)
                return
            if msg.finish_reason:
                ending.finish_reason, ending.usage = msg.finish_reason, msg.usage
                yield Piece(cut.text + stops.flush(), is_final=True)
                return
            yield Piece(cut.text)
        raise PipelineError(grpc.StatusCode.UNAVAILABLE,
                            "the worker stream ended without a finish; retry")


def _replay(req: PipelineRequest, prompt_tokens: int, answer: cache_pb2.CachedAnswer
            ) -> list[Event]:
    """A cached answer as the events of a live generation, its usage marked cached."""
    usage = common_pb2.Usage()
    usage.CopyFrom(answer.usage)
    usage.response_cached = True
    chunks = list(answer.text_chunks) or [answer.text]
    return [Started(req.request_id, req.model, req.model_version, prompt_tokens,
                    req.messages if req.prompt is None else ()),
            *(TextChunk(c) for c in chunks if c), Finished(answer.finish_reason, usage)]
