"""The chain as ``build_pipeline`` assembles it, over in-process fakes of every stub: which
stages a deployment gets, and the exact events of whole requests through all of them."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from genmesh.core import metadata
from genmesh.v1 import common_pb2
from services.frontend.admission import Admission, AdmissionPolicy
from services.frontend.errors import PipelineError
from services.frontend.events import ChunkLogprob, Event, Finished, Started, TextChunk
from services.frontend.moderation import ModerationMode, SafetyGate, SafetySettings
from services.frontend.pipeline import Pipeline, PipelineRequest, build_pipeline
from services.frontend.response_cache import CacheSettings, ResponseCache
from tests.services.frontend.stages.fakes import (
    FakeBudgets,
    FakeCache,
    FakeDetokenizers,
    FakeSafety,
    FakeTokenizer,
    FakeWorker,
    output_logprob,
    request,
    rpc_error,
    tokens,
)

LENGTH = common_pb2.FINISH_REASON_LENGTH
USAGE = common_pb2.Usage(prompt_tokens=2, completion_tokens=5)
# " Hello world!" in five tokens, the last one finishing.
HELLO = [tokens(1), tokens(2), tokens(3), tokens(4), tokens(5, finish=LENGTH, usage=USAGE)]


class Mesh:
    """The fakes of one frontend's downstream services, and its pipeline over them."""

    def __init__(self, messages: list, *, safety: bool = True, cache: bool = True,
                 budgets: bool = True, mode: ModerationMode = ModerationMode.ADAPTIVE,
                 versions: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.worker = FakeTokenizer(), FakeWorker(messages)
        self.detokenizers, self.safety = FakeDetokenizers(), FakeSafety()
        self.cache, self.budgets = FakeCache(), FakeBudgets()
        self.pipeline = build_pipeline(
            tokenizer=self.tokenizer, worker=self.worker,  # type: ignore[arg-type]
            rpc_timeout_s=1.0, detokenizers=self.detokenizers,
            admission=Admission(AdmissionPolicy(tenants={"acme": 1000}),
                                self.budgets if budgets else None),  # type: ignore[arg-type]
            safety=SafetyGate(self.safety, SafetySettings(  # type: ignore[arg-type]
                moderation_mode=mode)) if safety else None,
            cache=ResponseCache(self.cache, CacheSettings()) if cache else None,  # type: ignore[arg-type]
            versions=versions)


def events_of(pipeline: Pipeline, req: PipelineRequest) -> list[Event]:
    async def run() -> list[Event]:
        async with contextlib.aclosing(pipeline.run(req, timeout_s=5.0)) as events:
            seen = [event async for event in events]
        for _ in range(5):  # background releases of cache leases
            await asyncio.sleep(0)
        return seen

    return asyncio.run(run())


def text_of(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextChunk))


def test_a_deployment_without_a_feature_has_no_stage_for_it():
    assert Mesh([], safety=False, cache=False, budgets=False).pipeline.stage_names == (
        "Tokenize", "Generate", "Detokenize", "CutAtStops")
    assert Mesh([]).pipeline.stage_names == (
        "TokenizeAndCheck", "CacheAnswers", "ReserveBudget", "Generate", "Detokenize",
        "CutAtStops", "Moderate")


@pytest.mark.parametrize("features", [{}, {"safety": False, "cache": False, "budgets": False}])
def test_a_request_through_every_stage(features):
    mesh = Mesh(HELLO, **features)
    events = events_of(mesh.pipeline, request(prompt="Hi you"))
    assert events[0] == Started("r1", "m", "v1", 2)
    assert text_of(events) == "Hello world!"
    assert events[-1] == Finished(LENGTH, USAGE)
    assert mesh.worker.calls[0].is_cancelled and mesh.detokenizers.opened[0].is_closed
    if not features:
        assert mesh.budgets.log == [("reserve", 2 + 8), ("settle", 2 + 5)]
        assert [s.answer.text for s in mesh.cache.stored] == ["Hello world!"]
        assert mesh.safety.checked == ["Hi you"]


def test_the_exact_events_without_moderation():
    mesh = Mesh(HELLO, safety=False)
    assert events_of(mesh.pipeline, request()) == [
        Started("r1", "m", "v1", 2), TextChunk("Hel"), TextChunk("lo"), TextChunk(" wor"),
        TextChunk("ld"), TextChunk("!", is_final=True), Finished(LENGTH, USAGE)]


def test_a_repeated_request_is_answered_from_the_cache_without_a_worker_or_budget():
    mesh = Mesh(HELLO)
    first = events_of(mesh.pipeline, request())
    mesh.cache.answer = mesh.cache.stored[0].answer
    again = events_of(mesh.pipeline, request())
    cached = common_pb2.Usage(prompt_tokens=2, completion_tokens=5, response_cached=True)
    assert again == [first[0], *(TextChunk(e.text) for e in first[1:-1]
                                 if isinstance(e, TextChunk)), Finished(LENGTH, cached)]
    assert len(mesh.worker.calls) == 1 and len(mesh.budgets.log) == 2


def test_a_frontend_of_one_version_keys_and_routes_requests_to_it_without_asking():
    mesh = Mesh(HELLO, versions=("v1",))
    mesh.worker.stats_error = rpc_error(grpc.StatusCode.UNAVAILABLE, "no healthy upstream")
    events = events_of(mesh.pipeline, request(model_version=""))
    assert text_of(events) == "Hello world!"
    assert [k.model_version for k in mesh.cache.keys] == ["v1"]
    [generate] = mesh.worker.metadata  # the Generate call's alone: no GetStats
    assert generate[metadata.ROUTED_VERSION] == "v1"


@pytest.mark.parametrize("mode", list(ModerationMode))
def test_a_blocked_phrase_split_across_tokens_never_reaches_the_client(mode):
    # "Hello B" + "AD" + " ok": the phrase BAD comes in two tokens.
    mesh = Mesh([tokens(1), tokens(2), tokens(6), tokens(7), tokens(8),
                 tokens(5, finish=LENGTH, usage=USAGE)], mode=mode)
    events = events_of(mesh.pipeline, request())
    assert text_of(events) == "Hello "
    assert isinstance(events[-1], Finished)
    assert events[-1].finish_reason == common_pb2.FINISH_REASON_CONTENT_FILTER
    assert events[-1].detail == "violence"
    assert mesh.worker.calls[0].is_cancelled and mesh.safety.calls[0].is_cancelled
    assert mesh.cache.stored == [] and mesh.cache.released == ["lease-1"]
    num_generated = mesh.worker.calls[0].num_read
    assert mesh.budgets.log == [("reserve", 10), ("settle", 2 + num_generated)]


def test_a_stop_string_ends_the_worker_request_with_the_tokens_so_far():
    mesh = Mesh(HELLO + [tokens(9)])
    params = common_pb2.SamplingParams(max_tokens=8, stop=["wor"])
    events = events_of(mesh.pipeline, request(params=params))
    assert text_of(events) == "Hello "
    assert events[-1] == Finished(common_pb2.FINISH_REASON_STOP,
                                  common_pb2.Usage(prompt_tokens=2, completion_tokens=3))
    assert mesh.worker.calls[0].num_read == 3 and mesh.worker.calls[0].is_cancelled


def test_bad_stop_strings_are_refused_before_any_stage_runs():
    mesh = Mesh(HELLO)
    with pytest.raises(PipelineError) as err:
        events_of(mesh.pipeline, request(params=common_pb2.SamplingParams(stop=[""])))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert mesh.tokenizer.texts == [] and mesh.safety.checked == []


def test_leaving_early_closes_every_stage():
    mesh = Mesh(HELLO, mode=ModerationMode.LOCKSTEP)

    async def leave_after_the_first_text() -> None:
        events = mesh.pipeline.run(request(), timeout_s=5.0)
        while not isinstance(await anext(events), TextChunk):
            pass
        await events.aclose()

    asyncio.run(leave_after_the_first_text())
    assert mesh.worker.calls[0].is_cancelled and mesh.detokenizers.opened[0].is_closed
    assert mesh.safety.calls[0].is_cancelled
    assert mesh.budgets.log[-1][0] == "settle"


# " Hello world!" again, each message with its token's logprobs.
HELLO_LOGPROBS = [tokens(1, logprobs=True), tokens(2, logprobs=True),
                  tokens(3, logprobs=True), tokens(4, logprobs=True),
                  tokens(5, finish=LENGTH, usage=USAGE, logprobs=True)]
ASK_LOGPROBS = common_pb2.SamplingParams(max_tokens=8, return_logprobs=True, logprobs=1,
                                         stop=["d!"])


def test_logprobs_go_with_their_text_through_the_stops_and_skip_the_cache():
    mesh = Mesh(HELLO_LOGPROBS, safety=False)
    events = events_of(mesh.pipeline, request(params=ASK_LOGPROBS))
    at = lambda end, token_id: ChunkLogprob(end, output_logprob(token_id, 1))  # noqa: E731
    # "ld" ends in "d", which could begin the stop string: "l" goes on, without the
    # token; "!" completes the stop string, which cuts "ld" (in part) and "!".
    assert events == [
        Started("r1", "m", "v1", 2), TextChunk("Hel", logprobs=(at(3, 1),)),
        TextChunk("lo", logprobs=(at(2, 2),)), TextChunk(" wor", logprobs=(at(4, 3),)),
        TextChunk("l"), Finished(common_pb2.FINISH_REASON_STOP,
                                 common_pb2.Usage(prompt_tokens=2, completion_tokens=5))]
    assert mesh.cache.keys == []
    assert mesh.worker.requests[0].params.logprobs == 1


@pytest.mark.parametrize("mode", list(ModerationMode))
def test_logprobs_through_moderation_match_the_text_the_client_sees(mode):
    mesh = Mesh(HELLO_LOGPROBS, mode=mode)
    events = events_of(mesh.pipeline, request(params=ASK_LOGPROBS))
    chunks = [e for e in events if isinstance(e, TextChunk)]
    assert text_of(events) == "Hello worl"
    assert [c.logprob.token_id for e in chunks for c in e.logprobs] == [1, 2, 3]
    for chunk in chunks:  # each token's text ends where its chunk says
        for c in chunk.logprobs:
            assert chunk.text[:c.end].endswith(c.logprob.token)


def test_n_choices_share_one_prompt_stage_and_budget_and_run_side_by_side():
    mesh = Mesh(HELLO)
    params = common_pb2.SamplingParams(max_tokens=8, temperature=0.5, seed=7)
    events = events_of(mesh.pipeline, request(params=params, model_version="", n=3))
    assert [e for e in events if isinstance(e, Started)] == [Started("r1", "m", "v1", 2)]
    for index in range(3):
        assert "".join(e.text for e in events
                       if isinstance(e, TextChunk) and e.index == index) == "Hello world!"
    assert sorted(e.index for e in events if isinstance(e, Finished)) == [0, 1, 2]
    assert all(e.usage == USAGE for e in events if isinstance(e, Finished))
    worker = mesh.worker
    assert [r.params.seed for r in worker.requests] == [7, 8, 9]
    # The others start once the first has its first token (its prompt KV is cached),
    # all pinned to the version the rollout picked (GetStats asked which).
    assert worker.num_read_before[0] == 0 and min(worker.num_read_before[1:]) >= 1
    asked, *generates = worker.metadata
    assert metadata.ROUTED_VERSION not in asked
    assert [m.get(metadata.ROUTED_VERSION) for m in generates] == ["v2"] * 3
    assert all(call.is_cancelled for call in worker.calls)
    # One prompt check and tokenization, no cache, one budget for every choice.
    assert mesh.safety.checked == ["Hello there"] and len(mesh.tokenizer.texts) == 1
    assert mesh.cache.keys == [] and len(mesh.safety.calls) == 3
    assert mesh.budgets.log == [("reserve", 2 + 3 * 8), ("settle", 2 + 3 * 5)]


def test_a_failing_choice_ends_every_choice():
    mesh = Mesh([tokens(1), tokens(2)], safety=False)
    mesh.worker.error = rpc_error(grpc.StatusCode.UNAVAILABLE, "worker down")
    with pytest.raises(PipelineError) as err:
        events_of(mesh.pipeline, request(n=2))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert mesh.worker.calls and all(call.is_cancelled for call in mesh.worker.calls)
    assert mesh.budgets.log[-1][0] == "settle"


def test_leaving_n_choices_early_closes_every_choice_and_settles_their_tokens():
    mesh = Mesh(HELLO, mode=ModerationMode.LOCKSTEP)

    async def leave_after_the_first_text() -> None:
        events = mesh.pipeline.run(request(n=3), timeout_s=5.0)
        while not isinstance(await anext(events), TextChunk):
            pass
        await events.aclose()

    asyncio.run(leave_after_the_first_text())
    assert mesh.worker.calls and all(call.is_cancelled for call in mesh.worker.calls)
    assert all(d.is_closed for d in mesh.detokenizers.opened)
    num_read = sum(call.num_read for call in mesh.worker.calls)
    assert mesh.budgets.log == [("reserve", 2 + 3 * 8), ("settle", 2 + num_read)]
