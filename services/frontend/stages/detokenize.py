"""The detokenize stage: the worker's token ids as text, through the detokenizers chosen
at start-up (in-process, or the tokenizer service's stream; ``detokenize.py``).

A worker message becomes one TextChunk, or none while its ids complete no character. The
last message's text is marked final (and the detokenizer flushed with it); when it is
empty there is no chunk, and the Finished after it says the same.

With logprobs asked, the ids are detokenized one by one, and each token's logprobs go
into the chunk that has the last character of its text (``logprobs.py``): tokens that
make up one character go with it, and special tokens the text leaves out go nowhere.
That needs the tokens' own strings, known only to an in-process detokenizer: through the
tokenizer service the request is refused (FAILED_PRECONDITION) before the worker runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator

import grpc

from genmesh.core.models.token_strings import TokenStrings
from genmesh.v1 import generation_pb2, worker_pb2
from services.frontend.detokenize import Detokenizers, Detokenizing
from services.frontend.errors import PipelineError
from services.frontend.events import ChunkLogprob, Started, TextChunk
from services.frontend.logprobs import output_logprob, wants_logprobs
from services.frontend.stages.call import Call, Next, StageEvent

_WorkerMessage = worker_pb2.WorkerGenerateResponse


class Detokenize:
    def __init__(self, detokenizers: Detokenizers) -> None:
        self.detokenizers = detokenizers

    async def run(self, call: Call, rest: Next) -> AsyncGenerator[StageEvent, None]:
        logprobs: _Logprobs | None = None
        if wants_logprobs(call.req.params):
            strings = self.detokenizers.token_strings(call.req.model)
            if strings is None:
                raise PipelineError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "logprobs are not available here: this deployment's frontend has no "
                    "tokenizer in-process (it detokenizes through the tokenizer service); "
                    "ask without logprobs, or have the operator give the frontend the "
                    "model store")
            logprobs = _Logprobs(strings, num_top=call.req.params.logprobs)
        detok: Detokenizing | None = None
        observer = call.observer
        try:
            async with contextlib.aclosing(rest(call)) as events:
                async for event in events:
                    if type(event) is _WorkerMessage:
                        assert detok is not None  # generate streams Started first
                        is_final = bool(event.finish_reason)
                        start_ns = time.time_ns()
                        if logprobs is None:
                            text = await detok.text(event.token_ids, final=is_final)
                            observer.busy("detokenize", start_ns, time.time_ns())
                            if text:
                                yield TextChunk(text, is_final)
                            continue
                        chunk = await logprobs.chunk(detok, event, is_final)
                        observer.busy("detokenize", start_ns, time.time_ns())
                        if chunk.text:
                            yield chunk
                        continue
                    if type(event) is Started:
                        # Opened with the worker's stream: a remote detokenizer's setup
                        # overlaps the prefill, under the generate span.
                        detok = self.detokenizers.open(call.req.model, timeout_s=call.timeout_s)
                    yield event
        finally:
            if detok is not None:
                detok.close()


class _Logprobs:
    """One generation's tokens on their way into chunks."""

    def __init__(self, strings: TokenStrings, *, num_top: int) -> None:
        self.strings = strings
        self.num_top = num_top  # alternatives the client asked for per token
        # Tokens whose text is not out yet (a character still incomplete), in order.
        self.waiting: list[generation_pb2.OutputLogprob] = []

    async def chunk(self, detok: Detokenizing, msg: worker_pb2.WorkerGenerateResponse,
                    is_final: bool) -> TextChunk:
        if len(msg.logprobs) != len(msg.token_ids):
            raise PipelineError(grpc.StatusCode.INTERNAL,
                                f"the worker sent {len(msg.logprobs)} logprobs for "
                                f"{len(msg.token_ids)} tokens")
        texts, flushed = await detok.token_texts(msg.token_ids, final=is_final)
        parts: list[str] = []
        placed: list[ChunkLogprob] = []
        end = 0
        for token_id, lp, text in zip(msg.token_ids, msg.logprobs, texts, strict=True):
            if token_id not in self.strings.special_ids:
                self.waiting.append(output_logprob(lp, self.strings, num_top=self.num_top))
            if text:
                parts.append(text)
                end += len(text)
                placed += (ChunkLogprob(end, w) for w in self.waiting)
                self.waiting.clear()
        if flushed:
            parts.append(flushed)
            end += len(flushed)
            placed += (ChunkLogprob(end, w) for w in self.waiting)
        if is_final:
            self.waiting.clear()  # no text of theirs ever came
        return TextChunk("".join(parts), is_final, tuple(placed))
