"""What every stage shares: one request's state on its way down the chain (``Call``), the
one count of its tokens (``TokenCount``), and the interface of a stage (``Stage``).

A stage gets the call and ``rest``, the chain after it. It returns the call's events:
``rest(call)``'s, changed as the stage does (stops cut them, moderation holds them for
their verdicts), or its own (a cache hit replays an answer and never calls ``rest``). A
stage with nothing to do for a request returns ``rest(call)`` itself, so it costs that
request nothing per token. A stage that iterates ``rest(call)`` closes it when it is done
(``contextlib.aclosing``): closing the chain closes the worker's stream at its end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from genmesh.v1 import common_pb2, worker_pb2
from services.frontend.events import Event

if TYPE_CHECKING:
    from services.frontend.observe import RequestObserver
    from services.frontend.pipeline import PipelineRequest

# What flows between stages: the public events, and the worker's messages (token ids)
# from generate to detokenize, which turns them into TextChunks.
StageEvent = Event | worker_pb2.WorkerGenerateResponse


@dataclass(slots=True)
class TokenCount:
    """A request's tokens: the one count that the budget's settle, the usage of a cut
    generation and the request's log read. Only the prompt stage sets ``num_prompt``;
    only the generate stage adds to ``num_generated``."""

    num_prompt: int = 0  # tokens of the prompt (or rendered conversation) sent to the worker
    num_generated: int = 0  # tokens the worker has streamed so far

    @property
    def num_total(self) -> int:
        return self.num_prompt + self.num_generated

    def usage(self) -> common_pb2.Usage:
        """The usage of a generation cut here (stop string, moderation), not by the
        worker: the worker's own usage comes with its finish."""
        return common_pb2.Usage(prompt_tokens=self.num_prompt,
                                completion_tokens=self.num_generated)


@dataclass(slots=True)
class Call:
    """One request on its way down the chain."""

    # The request as it may go to the model: the prompt stage puts a redacted prompt
    # here, the cache stage the version the rollout picked.
    req: PipelineRequest
    timeout_s: float  # the longest the request may still run (the caller's deadline)
    observer: RequestObserver  # the request's metrics and spans
    tokens: TokenCount = field(default_factory=TokenCount)
    prompt_ids: list[int] = field(default_factory=list)  # set by the prompt stage
    # Set by the generate stage at the worker's first message: the prompt's KV is
    # computed, and its full blocks are in the worker's prefix cache for others to reuse.
    prefilled: asyncio.Event = field(default_factory=asyncio.Event)


Next = Callable[[Call], AsyncGenerator[StageEvent, None]]


class Stage(Protocol):
    def run(self, call: Call, rest: Next) -> AsyncGenerator[StageEvent, None]:
        """The events of ``call``; see the module's docstring."""
        ...
