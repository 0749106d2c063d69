"""The response-cache stage (``response_cache.py`` is the cache's client): a deterministic
request asks the gateway which version serves it, looks its answer up (or waits for an
identical request in flight) and replays a hit as the events of a live generation, with
no inference and no budget. On a miss it collects the text as the client sees it and
stores a complete answer before the client hears of the finish, so that a caller who
repeats the request at once finds it; an incomplete one gives its lease back.

Absent from a chain without a cache service; a request that is not deterministic, asks
to skip the cache, or asks for n > 1 choices (which single flight would fold into one),
skips the stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncGenerator, Awaitable, Callable

from genmesh.v1 import cache_pb2, common_pb2
from services.frontend.events import Finished, Started, TextChunk
from services.frontend.observe import tracer
from services.frontend.response_cache import ResponseCache, cache_key, is_cacheable
from services.frontend.stages.call import Call, Next, StageEvent

# Finishes whose answer is complete, and so worth replaying.
_STORED_FINISHES = frozenset({common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH})


class CacheAnswers:
    def __init__(self, cache: ResponseCache, *, routed_version: Callable[[Call], Awaitable[str]]
                 ) -> None:
        self.cache = cache
        # The version the rollout's split picks for a call (the generate stage asks the
        # worker's route): the key names the version whose answer it is.
        self.routed_version = routed_version

    def run(self, call: Call, rest: Next) -> AsyncGenerator[StageEvent, None]:
        if call.req.skip_cache or call.req.n > 1 or not is_cacheable(call.req.params):
            return rest(call)
        return self._cached(call, rest)

    async def _cached(self, call: Call, rest: Next) -> AsyncGenerator[StageEvent, None]:
        with call.observer.stage("cache_lookup"):
            if not call.req.model_version:
                call.req = dataclasses.replace(call.req, is_version_routed=True,
                                               model_version=await self.routed_version(call))
            req = call.req
            key = cache_key(tenant=req.tenant, model=req.model, version=req.model_version,
                            prompt_ids=call.prompt_ids, params=req.params)
            found = await self.cache.lookup(key, deadline_s=call.timeout_s)
        if found.answer is not None:
            for event in replay(call, found.answer):
                yield event
            return
        chunks: list[str] = []  # the text as streamed
        is_done = False  # stored (or not worth storing): no lease to give back
        try:
            async with contextlib.aclosing(rest(call)) as events:
                async for event in events:
                    if type(event) is TextChunk:
                        chunks.append(event.text)
                    elif type(event) is Finished:
                        is_done = True
                        await self._store(key, found.lease_id, chunks, event)
                    yield event
        finally:
            if found.lease_id and not is_done:
                self.cache.release_soon(key, found.lease_id)

    async def _store(self, key: cache_pb2.CacheKey, lease_id: str, chunks: list[str],
                     finished: Finished) -> None:
        if finished.finish_reason in _STORED_FINISHES:
            with tracer.start_as_current_span("cache_store"):
                await self.cache.store(key, cache_pb2.CachedAnswer(
                    text="".join(chunks), finish_reason=finished.finish_reason,
                    usage=finished.usage, text_chunks=chunks), lease_id=lease_id)
        elif lease_id:
            self.cache.release_soon(key, lease_id)


def replay(call: Call, answer: cache_pb2.CachedAnswer) -> list[StageEvent]:
    """A cached answer as the events of a live generation, its usage marked cached."""
    req = call.req
    usage = common_pb2.Usage()
    usage.CopyFrom(answer.usage)
    usage.response_cached = True
    chunks = list(answer.text_chunks) or [answer.text]
    return [Started(req.request_id, req.model, req.model_version, len(call.prompt_ids),
                    req.messages if req.prompt is None else ()),
            *(TextChunk(c) for c in chunks if c), Finished(answer.finish_reason, usage)]
