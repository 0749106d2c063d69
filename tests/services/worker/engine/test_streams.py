"""The caller's side of an engine: streams, hand-over of a step's deltas, coalescing."""

from __future__ import annotations

import asyncio

from services.worker.engine.outputs import (
    Delta,
    FinishReason,
    RequestTimings,
    TokenLogprob,
    Usage,
    merge_deltas,
)
from services.worker.engine.streams import RequestStream, StreamRegistry


def test_merged_deltas_keep_token_order_and_the_last_ones_finish():
    timings = RequestTimings(1.0, 0.1, 0.2, 0.3, 0.05)
    parts = [Delta("r", [1], logprobs=[TokenLogprob(1, -0.1)]),
             Delta("r", [2, 3], logprobs=[TokenLogprob(2, -0.2), TokenLogprob(3, -0.3)]),
             Delta("r", [4], finish_reason=FinishReason.LENGTH, usage=Usage(5, 4, 0),
                   logprobs=[TokenLogprob(4, -0.4)], timings=timings)]
    merged = merge_deltas(parts)
    assert merged == Delta("r", [1, 2, 3, 4], finish_reason=FinishReason.LENGTH,
                           usage=Usage(5, 4, 0),
                           logprobs=[TokenLogprob(t, -t / 10) for t in (1, 2, 3, 4)],
                           timings=timings)
    assert merge_deltas([Delta("r", [7])]) == Delta("r", [7])
    assert merge_deltas([Delta("r", [7]), Delta("r", [8])]).logprobs is None


def test_take_ready_hands_over_what_waits_and_stops_at_the_last_delta():
    async def main():
        registry = StreamRegistry()
        closed: list[str] = []
        sink = registry.open("r", lambda: None)
        stream = RequestStream("r", sink, lambda rid, _: closed.append(rid))
        assert stream.take_ready() == []
        registry.deliver([Delta("r", [1]), Delta("r", [2])])
        await asyncio.sleep(0)  # the hand-over runs on the loop
        first = await stream.__anext__()
        assert (first.new_token_ids, [d.new_token_ids for d in stream.take_ready()]) == (
            [1], [[2]])
        registry.deliver([Delta("r", [3], finish_reason=FinishReason.STOP),
                          Delta("r", [4])])  # nothing after a final delta reaches it
        await asyncio.sleep(0)
        assert [d.new_token_ids for d in stream.take_ready()] == [[3]]
        assert [d async for d in stream] == []
        await stream.aclose()
        return closed

    assert asyncio.run(main()) == []  # a finished stream aborts nothing when closed
