"""The detokenize stage over a scripted worker stream and fake detokenizers: a chunk per
message with text, the last marked final, the detokenizer opened with the stream and
closed however it ends; with logprobs, each token's in the chunk with its text's end."""

from __future__ import annotations

import grpc
import pytest

from genmesh.v1 import common_pb2
from services.frontend.errors import PipelineError
from services.frontend.events import ChunkLogprob, Finished, Started, TextChunk
from services.frontend.stages.detokenize import Detokenize
from tests.services.frontend.stages.fakes import (
    END_TOKEN,
    FakeDetokenizers,
    Upstream,
    call_of,
    collect,
    output_logprob,
    request,
    run,
    tokens,
)

STARTED = Started("r1", "m", "v1", 2)
LENGTH = Finished(common_pb2.FINISH_REASON_LENGTH, common_pb2.Usage(completion_tokens=4))


def test_each_message_becomes_its_text_and_the_last_is_final():
    detokenizers = FakeDetokenizers()
    upstream = Upstream(STARTED, tokens(1, 2), tokens(0), tokens(3),
                        tokens(4, finish=common_pb2.FINISH_REASON_LENGTH), LENGTH)
    events = run(collect(Detokenize(detokenizers).run(call_of(), upstream)))
    assert events == [STARTED, TextChunk("Hello"), TextChunk(" wor"),
                      TextChunk("ld", is_final=True), LENGTH]
    assert detokenizers.calls == [((1, 2), False), ((0,), False), ((3,), False), ((4,), True)]
    assert [d.is_closed for d in detokenizers.opened] == [True]
    assert upstream.is_closed


def test_an_empty_last_text_is_no_chunk_the_finish_follows():
    upstream = Upstream(STARTED, tokens(1), tokens(0, finish=common_pb2.FINISH_REASON_STOP),
                        Finished(common_pb2.FINISH_REASON_STOP))
    events = run(collect(Detokenize(FakeDetokenizers()).run(call_of(), upstream)))
    assert events == [STARTED, TextChunk("Hel"), Finished(common_pb2.FINISH_REASON_STOP)]


def test_the_detokenizer_opens_with_the_stream_and_closes_on_error():
    detokenizers = FakeDetokenizers()
    failure = PipelineError(grpc.StatusCode.UNAVAILABLE, "the worker is unavailable")
    upstream = Upstream(STARTED, tokens(1), error=failure)
    seen = []

    async def consume() -> None:
        async for event in Detokenize(detokenizers).run(call_of(), upstream):
            seen.append(event)

    with pytest.raises(PipelineError):
        run(consume())
    assert seen == [STARTED, TextChunk("Hel")]
    assert [d.is_closed for d in detokenizers.opened] == [True]


def test_a_stream_that_fails_before_it_started_opens_no_detokenizer():
    detokenizers = FakeDetokenizers()
    upstream = Upstream(error=PipelineError(grpc.StatusCode.UNAVAILABLE, "down"))
    with pytest.raises(PipelineError):
        run(collect(Detokenize(detokenizers).run(call_of(), upstream)))
    assert detokenizers.opened == []


def test_detokenizing_is_reported_as_busy_time():
    call = call_of()
    upstream = Upstream(STARTED, tokens(1), tokens(2, finish=common_pb2.FINISH_REASON_STOP),
                        Finished(common_pb2.FINISH_REASON_STOP))
    run(collect(Detokenize(FakeDetokenizers()).run(call, upstream)))
    assert call.observer.busy_kinds == ["detokenize", "detokenize"]  # type: ignore[attr-defined]


def asking_logprobs(num_top: int = 0):
    return call_of(request(params=common_pb2.SamplingParams(
        max_tokens=8, return_logprobs=True, logprobs=num_top)))


def test_each_token_s_logprobs_ride_with_the_end_of_its_text():
    stop = common_pb2.FINISH_REASON_STOP
    # 0 completes no character: its logprobs wait for the text after it. The end token is
    # left out of the text, and of the logprobs.
    upstream = Upstream(STARTED, tokens(1, 0, logprobs=True), tokens(2, 3, logprobs=True),
                        tokens(4, END_TOKEN, finish=stop, logprobs=True), Finished(stop))
    events = run(collect(Detokenize(FakeDetokenizers()).run(asking_logprobs(1), upstream)))
    assert events == [
        STARTED,
        TextChunk("Hel", logprobs=(ChunkLogprob(3, output_logprob(1, 1)),)),
        TextChunk("lo wor", logprobs=(ChunkLogprob(2, output_logprob(0, 1)),
                                      ChunkLogprob(2, output_logprob(2, 1)),
                                      ChunkLogprob(6, output_logprob(3, 1)))),
        TextChunk("ld", is_final=True, logprobs=(ChunkLogprob(2, output_logprob(4, 1)),)),
        Finished(stop)]


def test_no_alternatives_asked_none_reported_and_a_text_less_end_drops_its_tokens():
    stop = common_pb2.FINISH_REASON_STOP
    upstream = Upstream(STARTED, tokens(1, logprobs=True),
                        tokens(0, finish=stop, logprobs=True), Finished(stop))
    events = run(collect(Detokenize(FakeDetokenizers()).run(asking_logprobs(0), upstream)))
    assert events == [STARTED, TextChunk("Hel", logprobs=(ChunkLogprob(3, output_logprob(1)),)),
                      Finished(stop)]
    assert not output_logprob(1).top_logprobs


def test_logprobs_without_the_tokens_strings_are_refused_before_the_worker_runs():
    upstream = Upstream(STARTED)
    with pytest.raises(PipelineError) as err:
        run(collect(Detokenize(FakeDetokenizers(is_remote=True)).run(asking_logprobs(),
                                                                      upstream)))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "logprobs" in err.value.message and upstream.num_calls == 0


def test_a_worker_message_without_its_logprobs_is_an_internal_error():
    upstream = Upstream(STARTED, tokens(1, 2))
    with pytest.raises(PipelineError) as err:
        run(collect(Detokenize(FakeDetokenizers()).run(asking_logprobs(), upstream)))
    assert err.value.code == grpc.StatusCode.INTERNAL
