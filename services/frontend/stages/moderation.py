"""The moderation stage: the text goes over the safety service's Moderate stream, and only
what its verdicts return reaches the client (``moderation.py``: pipelined, adaptive,
windowed or lockstep, per the deployment). A block finishes the request with
FINISH_REASON_CONTENT_FILTER and the tokens counted so far; the upstream Finished is
passed on only after the last verdict. Absent from a chain without a safety service.

Tokens' logprobs wait with their text (``logprobs.LogprobLedger``) and go out with the
verdict that releases their last character; the tokens of a release that redacted text
are left out (their strings would tell what was redacted), and so are those after a block.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator

from genmesh.v1 import common_pb2
from services.frontend.events import Finished, TextChunk
from services.frontend.logprobs import LogprobLedger
from services.frontend.moderation import Piece, SafetyGate
from services.frontend.stages.call import Call, Next, StageEvent


class Moderate:
    def __init__(self, safety: SafetyGate) -> None:
        self.safety = safety

    async def run(self, call: Call, rest: Next) -> AsyncGenerator[StageEvent, None]:
        req = call.req
        moderation = self.safety.moderation(request_id=req.request_id, tenant=req.tenant)
        ending: list[Finished] = []
        ledger = LogprobLedger()
        try:
            async with contextlib.aclosing(rest(call)) as events:
                yield await anext(events)  # Started: it carries no text to moderate
                # Moderation reads the text as it comes and hands back what the client may
                # see, running ahead of its verdicts.
                async with contextlib.aclosing(moderation.moderate(
                        _pieces(events, ending, ledger),
                        on_verdict=functools.partial(call.observer.busy, "moderation"))
                        ) as moderated:
                    async for out in moderated:
                        logprobs = ledger.release(out.num_input_chars)
                        if out.text:
                            yield TextChunk(out.text, logprobs=() if out.is_redacted
                                            else logprobs)
                        if out.blocked:
                            yield Finished(common_pb2.FINISH_REASON_CONTENT_FILTER,
                                           call.tokens.usage(), detail=out.blocked)
                            return
                yield ending[0]
        finally:
            moderation.close()


async def _pieces(events: AsyncIterator[StageEvent], ending: list[Finished],
                  ledger: LogprobLedger) -> AsyncGenerator[Piece, None]:
    """The text of ``events`` as pieces to moderate (their tokens into ``ledger``); the
    Finished after it goes into ``ending``. The last text goes as the final piece, or an
    empty one when it had none, which flushes what the service holds back."""
    is_flushed = False
    async for event in events:
        if type(event) is TextChunk:
            ledger.read(event)
            is_flushed = event.is_final
            yield Piece(event.text, event.is_final)
        elif type(event) is Finished:
            ending.append(event)
            if not is_flushed:
                yield Piece("", is_final=True)
            return
