"""The moderation stage over scripted text and a fake safety service that answers at once
(holding back what could still grow into the blocked phrase): only text with a verdict
reaches the client, the last text goes with the flush, and a block ends the request;
tokens' logprobs go out with the verdicts on their text, except where it was redacted."""

from __future__ import annotations

import grpc
import pytest

from genmesh.v1 import common_pb2
from services.frontend.errors import PipelineError
from services.frontend.events import ChunkLogprob, Finished, Started, TextChunk
from services.frontend.moderation import ModerationMode, SafetyGate, SafetySettings
from services.frontend.stages.moderation import Moderate
from tests.services.frontend.stages.fakes import (
    FakeSafety,
    Upstream,
    call_of,
    collect,
    output_logprob,
    run,
)

STARTED = Started("r1", "m", "v1", 2)
LENGTH = Finished(common_pb2.FINISH_REASON_LENGTH, common_pb2.Usage(completion_tokens=9))
MODES = [ModerationMode.ADAPTIVE, ModerationMode.PIPELINED, ModerationMode.WINDOW,
         ModerationMode.LOCKSTEP]


def moderate(safety: FakeSafety, mode: ModerationMode = ModerationMode.PIPELINED) -> Moderate:
    return Moderate(SafetyGate(safety, SafetySettings(moderation_mode=mode)))  # type: ignore[arg-type]


def text_of(events: list[object]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextChunk))


@pytest.mark.parametrize("mode", [ModerationMode.PIPELINED, ModerationMode.LOCKSTEP])
def test_each_text_goes_to_the_service_and_the_last_with_the_flush(mode):
    safety = FakeSafety()
    upstream = Upstream(STARTED, TextChunk("Hello"), TextChunk(" wor"),
                        TextChunk("ld", is_final=True), LENGTH)
    events = run(collect(moderate(safety, mode).run(call_of(), upstream)))
    assert events == [STARTED, TextChunk("Hello"), TextChunk(" wor"), TextChunk("ld"), LENGTH]
    assert safety.calls[0].written == [("Hello", False), (" wor", False), ("ld", True)]
    assert upstream.is_closed and safety.calls[0].is_cancelled


def test_a_finish_after_no_last_text_flushes_what_the_service_holds_back():
    safety = FakeSafety()
    upstream = Upstream(STARTED, TextChunk("ok B"), LENGTH)  # "B" could start "BAD"
    events = run(collect(moderate(safety).run(call_of(), upstream)))
    assert events == [STARTED, TextChunk("ok "), TextChunk("B"), LENGTH]
    assert safety.calls[0].written == [("ok B", False), ("", True)]


def test_no_text_opens_no_stream():
    safety = FakeSafety()
    events = run(collect(moderate(safety).run(call_of(), Upstream(STARTED, LENGTH))))
    assert events == [STARTED, LENGTH]
    assert safety.calls == []


@pytest.mark.parametrize("mode", MODES)
def test_a_blocked_phrase_split_across_chunks_never_reaches_the_client(mode):
    safety = FakeSafety()
    upstream = Upstream(STARTED, TextChunk("Fine"), TextChunk(" B"), TextChunk("A"),
                        TextChunk("D news"), TextChunk(" more"), TextChunk(".", is_final=True),
                        LENGTH)
    call = call_of(prompt_ids=[1, 2], num_generated=4)
    events = run(collect(moderate(safety, mode).run(call, upstream)))
    assert text_of(events) == "Fine "
    assert events[0] == STARTED
    assert events[-1] == Finished(common_pb2.FINISH_REASON_CONTENT_FILTER,
                                  common_pb2.Usage(prompt_tokens=2, completion_tokens=4),
                                  detail="violence")
    assert upstream.is_closed and safety.calls[0].is_cancelled


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_releases_the_whole_allowed_text_then_the_finish(mode):
    safety = FakeSafety()
    pieces = ["The", " lighthouse", " keeper", " climbed", " the", " stairs."]
    upstream = Upstream(STARTED, *(TextChunk(p) for p in pieces[:-1]),
                        TextChunk(pieces[-1], is_final=True), LENGTH)
    events = run(collect(moderate(safety, mode).run(call_of(), upstream)))
    assert events[0] == STARTED and events[-1] == LENGTH
    assert text_of(events) == "".join(pieces)
    assert all(e.text for e in events if isinstance(e, TextChunk))


def test_an_error_upstream_comes_after_the_verdicts_of_the_text_before_it():
    safety = FakeSafety()
    failure = PipelineError(grpc.StatusCode.UNAVAILABLE, "the worker is unavailable")
    upstream = Upstream(STARTED, TextChunk("Hello"), error=failure)
    seen = []

    async def consume() -> None:
        async for event in moderate(safety).run(call_of(), upstream):
            seen.append(event)

    with pytest.raises(PipelineError, match="the worker is unavailable"):
        run(consume())
    assert seen == [STARTED, TextChunk("Hello")]
    assert safety.calls[0].is_cancelled


def test_verdicts_are_reported_as_busy_time():
    call = call_of()
    upstream = Upstream(STARTED, TextChunk("a"), TextChunk("b", is_final=True), LENGTH)
    run(collect(moderate(FakeSafety()).run(call, upstream)))
    assert call.observer.busy_kinds == ["moderation", "moderation"]  # type: ignore[attr-defined]


def at(end: int, token_id: int) -> ChunkLogprob:
    return ChunkLogprob(end, output_logprob(token_id))


@pytest.mark.parametrize("mode", [m for m in MODES if m != ModerationMode.WINDOW])
def test_a_token_held_by_the_service_comes_with_its_verdict(mode):
    # " B" could begin "BAD": the service holds "B" until the flush releases it. (A
    # window gathers the text and the flush into one message.)
    upstream = Upstream(STARTED, TextChunk(" ok B", logprobs=(at(3, 8), at(5, 6))), LENGTH)
    events = run(collect(moderate(FakeSafety(), mode).run(call_of(), upstream)))
    assert events == [STARTED, TextChunk(" ok ", logprobs=(at(3, 8),)),
                      TextChunk("B", logprobs=(at(1, 6),)), LENGTH]


def test_the_tokens_before_a_block_are_reported_and_none_after():
    safety = FakeSafety()
    upstream = Upstream(STARTED, TextChunk(" ok", logprobs=(at(3, 8),)),
                        TextChunk(" BAD!", logprobs=(at(2, 6), at(4, 7), at(5, 5))), LENGTH)
    call = call_of(prompt_ids=[1, 2], num_generated=4)
    events = run(collect(moderate(safety).run(call, upstream)))
    assert events == [STARTED, TextChunk(" ok", logprobs=(at(3, 8),)), TextChunk(" "),
                      Finished(common_pb2.FINISH_REASON_CONTENT_FILTER,
                               common_pb2.Usage(prompt_tokens=2, completion_tokens=4),
                               detail="violence")]


def test_a_release_that_redacted_text_reports_none_of_its_tokens():
    upstream = Upstream(STARTED, TextChunk(" ok secret", logprobs=(at(3, 8), at(10, 10))),
                        TextChunk("!", is_final=True, logprobs=(at(1, 5),)), LENGTH)
    events = run(collect(moderate(FakeSafety()).run(call_of(), upstream)))
    assert events == [STARTED, TextChunk(" ok [redacted]"),
                      TextChunk("!", logprobs=(at(1, 5),)), LENGTH]
