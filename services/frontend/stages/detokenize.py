"""The detokenize stage: the worker's token ids as text, through the detokenizers chosen
at start-up (in-process, or the tokenizer service's stream; ``detokenize.py``).

A worker message becomes one TextChunk, or none while its ids complete no character. The
last message's text is marked final (and the detokenizer flushed with it); when it is
empty there is no chunk, and the Finished after it says the same.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator

from genmesh.v1 import worker_pb2
from services.frontend.detokenize import Detokenizers, Detokenizing
from services.frontend.events import Started, TextChunk
from services.frontend.stages.call import Call, Next, StageEvent

_WorkerMessage = worker_pb2.WorkerGenerateResponse


class Detokenize:
    def __init__(self, detokenizers: Detokenizers) -> None:
        self.detokenizers = detokenizers

    async def run(self, call: Call, rest: Next) -> AsyncGenerator[StageEvent, None]:
        detok: Detokenizing | None = None
        observer = call.observer
        try:
            async with contextlib.aclosing(rest(call)) as events:
                async for event in events:
                    if type(event) is _WorkerMessage:
                        assert detok is not None  # generate streams Started first
                        is_final = bool(event.finish_reason)
                        start_ns = time.time_ns()
                        text = await detok.text(event.token_ids, final=is_final)
                        observer.busy("detokenize", start_ns, time.time_ns())
                        if text:
                            yield TextChunk(text, is_final)
                        continue
                    if type(event) is Started:
                        # Opened with the worker's stream: a remote detokenizer's setup
                        # overlaps the prefill, under the generate span.
                        detok = self.detokenizers.open(call.req.model, timeout_s=call.timeout_s)
                    yield event
        finally:
            if detok is not None:
                detok.close()
