"""The stops stage: the request's stop strings cut the text (``stops.py`` holds back what
could still become one). At a match it finishes the request with FINISH_REASON_STOP and
the tokens counted so far, and closes the rest of the chain, which cancels the worker's
request. A request without stop strings skips the stage.

Tokens' logprobs wait with their text (``logprobs.LogprobLedger``): a token goes out with
the text that has its last character, and a token whose text runs into the stop string is
cut with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

from genmesh.v1 import common_pb2
from services.frontend.events import Finished, TextChunk
from services.frontend.logprobs import LogprobLedger
from services.frontend.stages.call import Call, Next, StageEvent
from services.frontend.stops import StopMatcher


class CutAtStops:
    def run(self, call: Call, rest: Next) -> AsyncGenerator[StageEvent, None]:
        stop = call.req.params.stop
        if not stop:
            return rest(call)
        return self._cut(call, rest, StopMatcher(list(stop)))

    async def _cut(self, call: Call, rest: Next, stops: StopMatcher
                   ) -> AsyncGenerator[StageEvent, None]:
        ledger = LogprobLedger()
        async with contextlib.aclosing(rest(call)) as events:
            async for event in events:
                if type(event) is TextChunk:
                    ledger.read(event)
                    cut = stops.feed(event.text)
                    if cut.is_stopped:
                        if cut.text:
                            yield TextChunk(cut.text, is_final=True,
                                            logprobs=ledger.release(len(cut.text)))
                        yield Finished(common_pb2.FINISH_REASON_STOP, call.tokens.usage())
                        return
                    if event.is_final:
                        text = cut.text + stops.flush()
                        if text:
                            yield TextChunk(text, is_final=True,
                                            logprobs=ledger.release(len(text)))
                    elif cut.text:
                        logprobs = ledger.release(len(cut.text))
                        if cut.text == event.text and logprobs == event.logprobs:
                            yield event  # nothing held back: the chunk as it came
                        else:
                            yield TextChunk(cut.text, logprobs=logprobs)
                    continue
                if type(event) is Finished:
                    held = stops.flush()  # the last text was empty: nothing flushed it yet
                    if held:
                        yield TextChunk(held, is_final=True, logprobs=ledger.release(len(held)))
                yield event
