"""n choices of one request (GenerateRequest.n): after the request stages ran once (one
tokenization and prompt check, one budget reservation for every choice), the output chain
(generate → detokenize → stops → moderation) runs once per choice, side by side.

Each choice is a worker request of its own, with its own seed (the request's + its index;
unseeded, the worker's random one) and its own token count, which the request's count
sums when they end (what the budget settles and the log reports). They share the prompt's
KV blocks through the worker's prefix cache: the first choice starts alone, and the
others once the worker has streamed its first token, when the prompt's full blocks are
cached; the version is pinned first (so a rollout split cannot send choices to different
versions), and the prompt's prefix key routes them all to one replica.

The events: the first choice's Started, then every choice's TextChunks and Finished,
tagged with its index, interleaved as they come. A choice's error ends every choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, Awaitable, Callable

from genmesh.v1 import common_pb2
from services.frontend.events import Finished, Started, TextChunk
from services.frontend.stages.call import Call, Next, StageEvent, TokenCount

MAX_NUM_CHOICES = 16
_SEED_MOD = 2**64  # SamplingParams.seed is a uint64


def choice_call(call: Call, index: int) -> Call:
    """The call of choice ``index``: the request's, with the choice's seed and count."""
    req = call.req
    if req.params.HasField("seed") and index:
        params = common_pb2.SamplingParams()
        params.CopyFrom(req.params)
        params.seed = (params.seed + index) % _SEED_MOD
        req = dataclasses.replace(req, params=params)
    return Call(req, timeout_s=call.timeout_s, observer=call.observer,
                tokens=TokenCount(num_prompt=call.tokens.num_prompt),
                prompt_ids=call.prompt_ids)


async def run_choices(call: Call, output: Next, *,
                      routed_version: Callable[[Call], Awaitable[str]]
                      ) -> AsyncGenerator[StageEvent, None]:
    """The events of ``call.req.n`` runs of ``output``, as the module says."""
    if not call.req.model_version:
        call.req = dataclasses.replace(call.req, is_version_routed=True,
                                       model_version=await routed_version(call))
    calls = [choice_call(call, i) for i in range(call.req.n)]
    # Each choice's events, then None when it ended, or the error that ended it.
    queue: asyncio.Queue[tuple[int, StageEvent | BaseException | None]] = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async with contextlib.aclosing(output(calls[index])) as events:
                async for event in events:
                    queue.put_nowait((index, event))
            queue.put_nowait((index, None))
        except Exception as exc:
            queue.put_nowait((index, exc))

    async def start_the_others(first: asyncio.Task[None]) -> list[asyncio.Task[None]]:
        prefilled = asyncio.ensure_future(calls[0].prefilled.wait())
        try:
            await asyncio.wait({prefilled, first}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            prefilled.cancel()
        return [asyncio.ensure_future(pump(i)) for i in range(1, len(calls))]

    first = asyncio.ensure_future(pump(0))
    starting = asyncio.ensure_future(start_the_others(first))
    try:
        num_running, is_started = len(calls), False
        while num_running:
            index, event = await queue.get()
            if event is None:
                num_running -= 1
            elif isinstance(event, BaseException):
                raise event
            elif type(event) is TextChunk or type(event) is Finished:
                yield dataclasses.replace(event, index=index)
            elif type(event) is Started:
                if not is_started:  # the first choice's; the others name the same
                    is_started = True
                    yield event
            else:
                yield event
    finally:
        starting.cancel()
        tasks = [first]
        with contextlib.suppress(asyncio.CancelledError):
            tasks += await starting
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        call.tokens.num_generated += sum(c.tokens.num_generated for c in calls)
