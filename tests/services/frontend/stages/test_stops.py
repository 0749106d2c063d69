"""The stops stage over scripted text: held-back text, the cut at a stop string (with the
count's usage, closing the stream above it), the flush at the end, and no stage at all
for a request without stop strings."""

from __future__ import annotations

from genmesh.v1 import common_pb2
from services.frontend.events import Finished, Started, TextChunk
from services.frontend.stages.stops import CutAtStops
from tests.services.frontend.stages.fakes import Upstream, call_of, collect, request, run

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
