"""The response-cache stage over a fake cache stub: a hit replays without running the
rest, a miss stores the complete answer before the finish goes on, an incomplete one gives
its lease back, and requests that may not be cached skip the stage."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from genmesh.v1 import cache_pb2, common_pb2
from services.frontend.errors import PipelineError
from services.frontend.events import Finished, Started, TextChunk
from services.frontend.response_cache import CacheSettings, ResponseCache
from services.frontend.stages.call import Call, StageEvent
from services.frontend.stages.response_cache import CacheAnswers
from tests.services.frontend.stages.fakes import (
    FakeCache,
    Upstream,
    call_of,
    collect,
    request,
    run,
)

GREEDY = common_pb2.SamplingParams(max_tokens=8)
STARTED = Started("r1", "m", "v1", 2)
USAGE = common_pb2.Usage(prompt_tokens=2, completion_tokens=3)
STOP = Finished(common_pb2.FINISH_REASON_STOP, USAGE)


class Router:
    def __init__(self) -> None:
        self.num_calls = 0

    async def __call__(self, call: Call) -> str:
        self.num_calls += 1
        return "v2"


def stage(cache: FakeCache, router: Router | None = None) -> CacheAnswers:
    return CacheAnswers(ResponseCache(cache, CacheSettings()),  # type: ignore[arg-type]
                        routed_version=router or Router())


async def settled(coro: object) -> object:
    """``coro``'s result once the releases it started in the background are done."""
    result = await coro  # type: ignore[misc]
    for _ in range(5):
        await asyncio.sleep(0)
    return result


@pytest.mark.parametrize("req", [
    request(params=common_pb2.SamplingParams(temperature=0.7)),  # sampled without a seed
    request(params=common_pb2.SamplingParams(logprobs=2)),
    request(params=common_pb2.SamplingParams(return_logprobs=True)),
    request(params=GREEDY, skip_cache=True),
    request(params=GREEDY, n=3),  # single flight would fold the choices into one
])
def test_requests_that_may_not_be_cached_skip_the_stage(req):
    cache, upstream = FakeCache(), Upstream(STARTED)
    assert stage(cache).run(call_of(req, prompt_ids=[1, 2]), upstream) is upstream.stream
    assert cache.keys == []


def test_a_miss_passes_the_generation_on_and_stores_it_before_the_finish():
    cache = FakeCache()
    upstream = Upstream(STARTED, TextChunk("Hel"), TextChunk("lo", is_final=True), STOP)
    call = call_of(request(params=GREEDY), prompt_ids=[1, 2])
    stored_at_finish = []

    async def consume() -> list[StageEvent]:
        events = []
        async for event in stage(cache).run(call, upstream):
            if isinstance(event, Finished):
                stored_at_finish.append(len(cache.stored))
            events.append(event)
        return events

    assert run(consume()) == [STARTED, TextChunk("Hel"), TextChunk("lo", is_final=True), STOP]
    assert stored_at_finish == [1]
    (store,) = cache.stored
    assert store.answer == cache_pb2.CachedAnswer(
        text="Hello", text_chunks=["Hel", "lo"], finish_reason=common_pb2.FINISH_REASON_STOP,
        usage=USAGE)
    assert store.lease_id == "lease-1" and cache.released == []
    assert (store.key.tenant, store.key.model_version, list(store.key.prompt_ids)) == (
        "acme", "v1", [1, 2])
    assert call.observer.stages == ["cache_lookup"]  # type: ignore[attr-defined]


def test_a_hit_replays_the_answer_and_never_runs_the_rest():
    answer = cache_pb2.CachedAnswer(text="Hello", text_chunks=["He", "llo"], usage=USAGE,
                                    finish_reason=common_pb2.FINISH_REASON_LENGTH)
    upstream = Upstream(STARTED)
    call = call_of(request(params=GREEDY), prompt_ids=[1, 2, 3])
    events = run(collect(stage(FakeCache(answer)).run(call, upstream)))
    cached = common_pb2.Usage(prompt_tokens=2, completion_tokens=3, response_cached=True)
    assert events == [Started("r1", "m", "v1", 3), TextChunk("He"), TextChunk("llo"),
                      Finished(common_pb2.FINISH_REASON_LENGTH, cached)]
    assert upstream.num_calls == 0


def test_an_unpinned_request_is_keyed_by_the_version_the_rollout_picks():
    cache, router = FakeCache(), Router()
    call = call_of(request(params=GREEDY, model_version=""), prompt_ids=[1, 2])
    run(collect(stage(cache, router).run(call, Upstream(STARTED, STOP))))
    assert router.num_calls == 1
    assert cache.keys[0].model_version == "v2"
    assert (call.req.model_version, call.req.is_version_routed) == ("v2", True)


def test_an_answer_cut_by_moderation_is_not_stored_and_its_lease_released():
    cache = FakeCache()
    upstream = Upstream(STARTED, TextChunk("Hel"),
                        Finished(common_pb2.FINISH_REASON_CONTENT_FILTER, detail="violence"))
    run(settled(collect(stage(cache).run(call_of(request(params=GREEDY), prompt_ids=[1]),
                                         upstream))))
    assert cache.stored == [] and cache.released == ["lease-1"]


def test_a_failed_generation_releases_its_lease():
    cache = FakeCache()
    upstream = Upstream(STARTED, TextChunk("Hel"),
                        error=PipelineError(grpc.StatusCode.UNAVAILABLE, "worker down"))

    async def fail() -> None:
        with pytest.raises(PipelineError):
            await collect(stage(cache).run(call_of(request(params=GREEDY), prompt_ids=[1]),
                                           upstream))
        await settled(asyncio.sleep(0))

    run(fail())
    assert cache.stored == [] and cache.released == ["lease-1"]


def test_a_caller_leaving_early_releases_the_lease_and_closes_the_rest():
    cache = FakeCache()
    upstream = Upstream(STARTED, TextChunk("Hel"), TextChunk("lo"), STOP)

    async def leave_after_started() -> None:
        events = stage(cache).run(call_of(request(params=GREEDY), prompt_ids=[1]), upstream)
        await anext(events)
        await events.aclose()
        for _ in range(5):
            await asyncio.sleep(0)

    run(leave_after_started())
    assert cache.released == ["lease-1"] and upstream.is_closed
