"""The pipeline of the public API: a chain of stages, like Envoy's filter chain in front
of it, chosen once at start-up from the deployment (``build_pipeline``) and run per request.

    prompt (tokenize + prompt check) → response cache → budget
      → generate → detokenize → stop strings → moderation → (settle, on the way out)

The request meets the request stages in that order (``services/frontend/stages/``), then
the worker's stream; the output meets the output stages in theirs. A feature the
deployment lacks is a stage the chain lacks (no safety service: tokenize without a check,
no moderation; no cache service: no cache stage; no budget store: no budget stage), and
a stage with nothing to do for a request (no stop strings, a tenant without a budget)
steps aside for it. Settling is each stage's way back out, however the request ended:
moderation and the worker's stream are closed, the budget refunds what was not used, the
cache stores a complete answer (or gives its lease back); the observer records the
usage. Every downstream call carries a deadline; leaving the stream early closes every
stage, which cancels the worker's request and frees its KV blocks.

A request for n > 1 choices meets the request stages once and the output stages once per
choice, side by side (``choices.py``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import cast

import grpc

from genmesh.core.models.chat_template import ChatMessage
from genmesh.v1 import common_pb2, tokenizer_pb2_grpc, worker_pb2_grpc
from services.frontend.admission import Admission
from services.frontend.choices import run_choices
from services.frontend.detokenize import Detokenizers, RemoteDetokenizers
from services.frontend.errors import PipelineError
from services.frontend.events import Event
from services.frontend.limits import DEFAULT_LIMITS, RequestLimits
from services.frontend.moderation import SafetyGate
from services.frontend.observe import RequestObserver
from services.frontend.response_cache import ResponseCache
from services.frontend.routing import Affinity
from services.frontend.stages.budget import ReserveBudget
from services.frontend.stages.call import Call, Next, Stage, StageEvent, TokenCount
from services.frontend.stages.detokenize import Detokenize
from services.frontend.stages.generate import Generate
from services.frontend.stages.moderation import Moderate
from services.frontend.stages.prompt import Tokenize, TokenizeAndCheck
from services.frontend.stages.response_cache import CacheAnswers
from services.frontend.stages.stops import CutAtStops
from services.frontend.stops import validate_stop_strings
from services.frontend.tools import Tools, with_tool_calls

log = logging.getLogger("genmesh.frontend")


@dataclass(frozen=True, slots=True)
class PipelineRequest:
    request_id: str
    model: str  # resolved model name (never empty)
    model_version: str  # a pinned version, or "" to let the gateway route
    prompt: str | None  # raw text to complete, or None for a chat
    messages: tuple[ChatMessage, ...]  # the conversation when prompt is None
    params: common_pb2.SamplingParams
    priority: common_pb2.Priority = common_pb2.PRIORITY_NORMAL
    tenant: str = ""  # from the gateway; isolates the worker's prefix cache and budgets
    # messages[:num_checked_messages] passed the prompt check before (a chat's history)
    num_checked_messages: int = 0
    skip_cache: bool = False  # never answer from, or store into, the response cache
    # The public call it serves (Generate, GenerateStream, Chat, GenerateBatch, Job): a
    # label of the request metrics.
    method: str = "Generate"
    # model_version was chosen by the rollout's split (not pinned by the caller): the
    # worker call goes to it the way a split call would, mirror included.
    is_version_routed: bool = False
    # Choices to generate, 1..choices.MAX_NUM_CHOICES: the output stages run once per
    # choice, and the events of each carry its index.
    n: int = 1
    # The functions shown to the model (None: none): the prompt stage renders them, and
    # each choice's calls are parsed out of its text (``tools.py``).
    tools: Tools | None = None


class Pipeline:
    def __init__(self, *, request_stages: Sequence[Stage], generate: Generate,
                 output_stages: Sequence[Stage], limits: RequestLimits = DEFAULT_LIMITS
                 ) -> None:
        """``request_stages`` in the order a request meets them, ``output_stages`` in the
        order the output meets them; composed here, once. ``limits`` refuse a request
        before any stage runs."""
        self.limits = limits
        self.stage_names = tuple(type(s).__name__ for s in (
            *request_stages, generate, *output_stages))
        output: Next = generate.run
        for stage in output_stages:
            output = functools.partial(stage.run, rest=output)
        self._output = output
        self._routed_version = generate.routed_version
        entry: Next = self._generation
        for stage in reversed(request_stages):
            entry = functools.partial(stage.run, rest=entry)
        self._entry = entry

    async def run(self, req: PipelineRequest, *, timeout_s: float
                  ) -> AsyncGenerator[Event, None]:
        """Streams Started, then TextChunks, then Finished (with n > 1: each choice's,
        tagged with its index, the choices' interleaved); raises PipelineError."""
        count = TokenCount()
        observer = RequestObserver(req, count)
        try:
            error = validate_stop_strings(list(req.params.stop))
            if error:
                raise PipelineError(grpc.StatusCode.INVALID_ARGUMENT, error)
            self.limits.check(req)
            call = Call(req, timeout_s=timeout_s, observer=observer, tokens=count)
            # The detokenize stage has turned every worker message into text.
            events = _observed(cast(AsyncGenerator[Event, None], self._entry(call)), observer)
            if req.tools is not None:  # the observer sees the text the model generated
                events = with_tool_calls(events, req.tools)
            async with contextlib.aclosing(events):
                async for event in events:
                    yield event
        except PipelineError as exc:
            observer.failed(exc.code.name)
            raise
        finally:
            observer.close()

    async def _generation(self, call: Call) -> AsyncGenerator[StageEvent, None]:
        """The worker's stream through the output stages, under one span: the worker's,
        detokenizer's and moderation's calls are its children."""
        async with contextlib.aclosing(call.observer.streamed_stage(
                "generate", self._output(call) if call.req.n == 1
                else run_choices(call, self._output, routed_version=self._routed_version))
                ) as events:
            async for event in events:
                yield event


async def _observed(events: AsyncGenerator[Event, None], observer: RequestObserver
                    ) -> AsyncGenerator[Event, None]:
    async with contextlib.aclosing(events):
        async for event in events:
            observer.see(event)
            yield event


def build_pipeline(*, tokenizer: tokenizer_pb2_grpc.TokenizerStub,
                   worker: worker_pb2_grpc.WorkerStub, rpc_timeout_s: float,
                   detokenizers: Detokenizers | None = None, admission: Admission | None = None,
                   affinity: Affinity | None = None, safety: SafetyGate | None = None,
                   cache: ResponseCache | None = None,
                   limits: RequestLimits = DEFAULT_LIMITS,
                   versions: tuple[str, ...] = ()) -> Pipeline:
    """The chain for what this deployment has: ``detokenizers`` as chosen at start-up
    (default: the tokenizer service's stream); without ``safety``, ``cache``, or budgets
    in ``admission``, the stages they need are left out. ``versions``: the model versions
    served (with one, no call asks the gateway which one a request is routed to)."""
    generate = Generate(worker, affinity=affinity or Affinity(), rpc_timeout_s=rpc_timeout_s,
                        versions=versions)
    request_stages: list[Stage] = [
        Tokenize(tokenizer, rpc_timeout_s=rpc_timeout_s) if safety is None
        else TokenizeAndCheck(tokenizer, safety, rpc_timeout_s=rpc_timeout_s)]
    if cache is not None:
        request_stages.append(CacheAnswers(cache, routed_version=generate.routed_version))
    if admission is not None and admission.budgets is not None:
        request_stages.append(ReserveBudget(admission))
    output_stages: list[Stage] = [
        Detokenize(detokenizers or RemoteDetokenizers(tokenizer)), CutAtStops()]
    if safety is not None:
        output_stages.append(Moderate(safety))
    pipeline = Pipeline(request_stages=request_stages, generate=generate,
                        output_stages=output_stages, limits=limits)
    log.info("pipeline stages", extra={"stages": list(pipeline.stage_names)})
    return pipeline
