"""Logprobs on their way to the client, beside the text they belong to.

The worker sends one ``TokenLogprob`` per token (ids only). The detokenize stage gives
each its strings (``TokenStrings``, from the tokenizer held in-process) and puts it in the
TextChunk that has the last character of its text, at that character's end
(``ChunkLogprob.end``). A stage that holds text back (stop strings, moderation) keeps the
tokens in a ``LogprobLedger`` at their ends in the text it has read, and releases each
with the text it ends in; what it never releases (cut by a stop string, after a block)
is never reported.
"""

from __future__ import annotations

from collections import deque

from genmesh.core.models.token_strings import TokenStrings
from genmesh.v1 import common_pb2, generation_pb2
from services.frontend.events import ChunkLogprob, TextChunk


def wants_logprobs(params: common_pb2.SamplingParams) -> bool:
    """The request asks for logprobs (return_logprobs, or top alternatives)."""
    return params.return_logprobs or params.logprobs > 0


def set_worker_logprobs(params: common_pb2.SamplingParams) -> None:
    """Makes the worker's copy of the params ask for what the client wants: the worker
    reports logprobs only with at least one alternative, which ``output_logprob`` drops
    again when the client asked for none."""
    if params.return_logprobs:
        params.return_logprobs = False
        params.logprobs = max(params.logprobs, 1)


def output_logprob(lp: common_pb2.TokenLogprob, strings: TokenStrings, *, num_top: int
                   ) -> generation_pb2.OutputLogprob:
    """The worker's logprob of one token, with its strings and ``num_top`` alternatives."""
    own = strings(lp.token_id)
    out = generation_pb2.OutputLogprob(token_id=lp.token_id, token=own.text,
                                       token_bytes=own.raw, logprob=lp.logprob)
    for top in lp.top[:num_top]:
        s = strings(top.token_id)
        out.top_logprobs.add(token_id=top.token_id, token=s.text, token_bytes=s.raw,
                             logprob=top.logprob)
    return out


class LogprobLedger:
    """The tokens of the text one stage has read and not released yet."""

    def __init__(self) -> None:
        self._pending: deque[ChunkLogprob] = deque()  # ends in the text read, in order
        self._num_read = 0  # characters of text read
        self._num_released = 0  # characters of it released

    def read(self, chunk: TextChunk) -> None:
        for lp in chunk.logprobs:
            self._pending.append(ChunkLogprob(self._num_read + lp.end, lp.logprob))
        self._num_read += len(chunk.text)

    def release(self, num_chars: int) -> tuple[ChunkLogprob, ...]:
        """The tokens whose text ends in the next ``num_chars`` characters read, their
        ends counted from the first of them."""
        start = self._num_released
        self._num_released += num_chars
        pending = self._pending
        if not pending or pending[0].end > self._num_released:
            return ()
        out = []
        while pending and pending[0].end <= self._num_released:
            lp = pending.popleft()
            out.append(ChunkLogprob(lp.end - start, lp.logprob))
        return tuple(out)
