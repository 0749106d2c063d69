"""The stops stage over scripted text: held-back text, the cut at a stop string (with the
count's usage, closing the stream above it), the flush at the end, and no stage at all
for a request without stop strings; tokens' logprobs held and cut with their text."""

from __future__ import annotations

from genmesh.v1 import common_pb2
from services.frontend.events import ChunkLogprob, Finished, Started, TextChunk
from services.frontend.stages.stops import CutAtStops
from tests.services.frontend.stages.fakes import (
    Upstream,
    call_of,
    collect,
    output_logprob,
    request,
    run,
)

STARTED = Started("r1", "m", "v1", 3)
STOP = Finished(common_pb2.FINISH_REASON_STOP, common_pb2.Usage(completion_tokens=5))


def stopping_at(*stop: str, num_generated: int = 0):
    req = request(params=common_pb2.SamplingParams(max_tokens=8, stop=list(stop)))
    return call_of(req, prompt_ids=[1, 2, 3], num_generated=num_generated)


def test_without_stop_strings_the_stage_steps_aside():
    upstream = Upstream(STARTED)
    call = call_of()
    assert CutAtStops().run(call, upstream) is upstream.stream


def test_a_stop_string_split_over_chunks_is_never_released_and_cuts_the_output():
    upstream = Upstream(STARTED, TextChunk("Hello EN"), TextChunk("D of it"), TextChunk("x"),
                        STOP)
    call = stopping_at("END", num_generated=4)
    events = run(collect(CutAtStops().run(call, upstream)))
    assert events == [STARTED, TextChunk("Hello "),
                      Finished(common_pb2.FINISH_REASON_STOP,
                               common_pb2.Usage(prompt_tokens=3, completion_tokens=4))]
    assert upstream.is_closed and upstream.num_read == 3  # the rest never read


def test_a_cut_with_text_before_it_marks_that_text_final():
    upstream = Upstream(STARTED, TextChunk("ab"), TextChunk("c!d"), STOP)
    events = run(collect(CutAtStops().run(stopping_at("!"), upstream)))
    assert events[1:3] == [TextChunk("ab"), TextChunk("c", is_final=True)]


def test_held_text_is_flushed_with_the_final_chunk():
    upstream = Upstream(STARTED, TextChunk("Hello E"), TextChunk("N", is_final=True), STOP)
    events = run(collect(CutAtStops().run(stopping_at("END"), upstream)))
    assert events == [STARTED, TextChunk("Hello "), TextChunk("EN", is_final=True), STOP]


def test_held_text_is_flushed_at_the_finish_when_the_last_text_was_empty():
    upstream = Upstream(STARTED, TextChunk("Hello E"), STOP)
    events = run(collect(CutAtStops().run(stopping_at("END"), upstream)))
    assert events == [STARTED, TextChunk("Hello "), TextChunk("E", is_final=True), STOP]


def at(end: int, token_id: int) -> ChunkLogprob:
    return ChunkLogprob(end, output_logprob(token_id))


def test_a_token_held_back_with_its_text_goes_out_with_it():
    # "Hel" "lo" " E" | "x" "!": " E" could begin "END" until "x" rules it out.
    upstream = Upstream(STARTED, TextChunk("Hello E", logprobs=(at(3, 1), at(5, 2), at(7, 6))),
                        TextChunk("x!", logprobs=(at(1, 8), at(2, 5))), STOP)
    events = run(collect(CutAtStops().run(stopping_at("END"), upstream)))
    assert events == [STARTED, TextChunk("Hello ", logprobs=(at(3, 1), at(5, 2))),
                      TextChunk("Ex!", logprobs=(at(1, 6), at(2, 8), at(3, 5))), STOP]


def test_tokens_cut_by_the_stop_string_are_not_reported_even_in_part():
    # " ok" reaches the client; " END" is the stop string's, "D o" runs into it.
    upstream = Upstream(STARTED, TextChunk(" ok EN", logprobs=(at(3, 8), at(6, 9))),
                        TextChunk("D of it", logprobs=(at(3, 7), at(7, 3))), STOP)
    events = run(collect(CutAtStops().run(stopping_at("END", num_generated=4), upstream)))
    assert events == [STARTED, TextChunk(" ok ", logprobs=(at(3, 8),)),
                      Finished(common_pb2.FINISH_REASON_STOP,
                               common_pb2.Usage(prompt_tokens=3, completion_tokens=4))]


def test_the_final_flush_releases_the_held_tokens():
    upstream = Upstream(STARTED, TextChunk("ok E", logprobs=(at(2, 8), at(4, 6))), STOP)
    events = run(collect(CutAtStops().run(stopping_at("END"), upstream)))
    assert events == [STARTED, TextChunk("ok ", logprobs=(at(2, 8),)),
                      TextChunk("E", is_final=True, logprobs=(at(1, 6),)), STOP]


def test_a_chunk_with_nothing_held_passes_as_it_came():
    chunk = TextChunk("Hello", logprobs=(at(3, 1), at(5, 2)))
    upstream = Upstream(STARTED, chunk, STOP)
    events = run(collect(CutAtStops().run(stopping_at("END"), upstream)))
    assert events[1] is chunk
