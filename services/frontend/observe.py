"""What one pipeline run tells operators: its Prometheus series and its spans.

The pipeline reports what happens (``see`` each event, ``tokens`` as the worker streams,
``stage`` around each step) and this module owns the clocks, the series and the span
attributes (OpenTelemetry's GenAI conventions; never the prompt or the output). Per-token
work (detokenizing, moderating) is one span per request with its call count and busy
time, not a span per token.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from opentelemetry import trace

from genmesh.v1 import common_pb2
from services.common import telemetry
from services.frontend import metrics
from services.frontend.events import Event, Finished, Started, TextChunk

if TYPE_CHECKING:
    from services.frontend.pipeline import PipelineRequest
    from services.frontend.stages.call import TokenCount

log = logging.getLogger("genmesh.frontend")
tracer = telemetry.tracer(__name__)
T = TypeVar("T")

FINISH_NAMES = {
    common_pb2.FINISH_REASON_UNSPECIFIED: "none",
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
    common_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
    common_pb2.FINISH_REASON_ERROR: "error",
}


@dataclass(slots=True)
class _Busy:
    """Many short calls of one kind, summed: the first start, the last end, the total."""

    first_ns: int = 0
    last_ns: int = 0
    busy_ns: int = 0
    num_calls: int = 0

    def add(self, start_ns: int, end_ns: int) -> None:
        self.first_ns = self.first_ns or start_ns
        self.last_ns = end_ns
        self.busy_ns += end_ns - start_ns
        self.num_calls += 1


class RequestObserver:
    def __init__(self, req: PipelineRequest, count: TokenCount) -> None:
        self.req = req
        self.count = count  # the request's token count (the generate stage adds to it)
        self.t0 = time.perf_counter()
        self.version = req.model_version
        self.ttft_s: float | None = None
        self._last_tokens_at: float | None = None
        self._busy = {"detokenize": _Busy(), "moderation": _Busy()}
        self._is_done = False
        # The finishes seen so far, by choice (one per choice with n > 1).
        self._finished_choices: dict[int, Finished] = {}
        self.span = trace.get_current_span()  # the call's span (or the chat turn's)
        if self.span.is_recording():
            p = req.params
            self.span.set_attributes({
                telemetry.GEN_AI_SYSTEM: telemetry.SYSTEM,
                telemetry.GEN_AI_OPERATION: "chat" if req.prompt is None else "text_completion",
                telemetry.GEN_AI_REQUEST_MODEL: req.model,
                telemetry.GEN_AI_REQUEST_MAX_TOKENS: p.max_tokens,
                telemetry.GEN_AI_REQUEST_TEMPERATURE: p.temperature,
                telemetry.GEN_AI_RESPONSE_ID: req.request_id,
                "genmesh.tenant": req.tenant, "genmesh.method": req.method})
        metrics.IN_FLIGHT.labels(req.method).inc()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """A span around a step that awaits (never around a ``yield``: see
        ``streamed_stage``)."""
        with tracer.start_as_current_span(name):
            yield

    async def streamed_stage(self, name: str, events: AsyncGenerator[T, None]
                             ) -> AsyncGenerator[T, None]:
        """``events`` under the span ``name``, which is current while the next event is
        awaited (the calls made meanwhile are its children) and never across a yield: a
        context attached there would stay current for the consumer, and could be detached
        only in the context that attached it, while a stream may be closed from another
        (OpenTelemetry's "Failed to detach context")."""
        span = tracer.start_span(name)
        try:
            async with contextlib.aclosing(events):
                while True:
                    with trace.use_span(span):
                        try:
                            event = await anext(events)
                        except StopAsyncIteration:
                            return
                    yield event
        finally:
            span.end()

    def busy(self, kind: str, start_ns: int, end_ns: int) -> None:
        """One detokenize or moderation call took [start_ns, end_ns) (time.time_ns())."""
        self._busy[kind].add(start_ns, end_ns)

    def tokens(self, num_tokens: int) -> None:
        """The worker streamed ``num_tokens`` more tokens (counted in ``count``)."""
        now = time.perf_counter()
        if self._last_tokens_at is not None and num_tokens > 0:
            gap = (now - self._last_tokens_at) / num_tokens
            labels = metrics.ITL.labels(self.req.model, self.version)
            for _ in range(num_tokens):
                labels.observe(gap)
        self._last_tokens_at = now

    def see(self, event: Event) -> None:
        if isinstance(event, Started):
            self.version = event.model_version
        elif isinstance(event, TextChunk) and self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.t0
            metrics.TTFT.labels(self.req.model, self.version).observe(self.ttft_s)
        elif isinstance(event, Finished):
            self._finished(event)

    def failed(self, code_name: str) -> None:
        metrics.ERRORS.labels(self.req.model, self.req.tenant, code_name).inc()
        if self.span.is_recording():
            self.span.set_attribute("genmesh.error_code", code_name)

    def close(self) -> None:
        """The request ended, however: its log line, and its per-token work as spans."""
        metrics.IN_FLIGHT.labels(self.req.method).dec()
        log.info("request done", extra={
            "request_id": self.req.request_id, "prompt_tokens": self.count.num_prompt,
            "completion_tokens": self.count.num_generated,
            "ttft_ms": round((self.ttft_s or 0.0) * 1e3, 2),
            "ms": round((time.perf_counter() - self.t0) * 1e3, 1)})
        for kind, busy in self._busy.items():
            if busy.num_calls:
                span = tracer.start_span(kind, start_time=busy.first_ns)
                span.set_attributes({"genmesh.num_calls": busy.num_calls,
                                     "genmesh.busy_ms": round(busy.busy_ns / 1e6, 3)})
                span.end(end_time=busy.last_ns)

    def _finished(self, event: Finished) -> None:
        """Each choice's tokens count as they finish; the request, once all have."""
        req, usage = self.req, event.usage
        if not usage.response_cached:  # inference ran: its tokens count as throughput
            # Per worker request: with n > 1 each choice's prompt, mostly from the cache.
            metrics.PROMPT_TOKENS.labels(req.model, req.tenant).inc(usage.prompt_tokens)
            metrics.GENERATION_TOKENS.labels(req.model, req.tenant).inc(usage.completion_tokens)
            metrics.CACHED_PROMPT_TOKENS.labels(req.model, req.tenant).inc(
                usage.cached_prompt_tokens)
        self._finished_choices[event.index] = event
        if len(self._finished_choices) < req.n:
            return
        first = self._finished_choices.get(0, event)
        reasons = [FINISH_NAMES.get(f.finish_reason, "none")
                   for _, f in sorted(self._finished_choices.items())]
        if self.ttft_s is None:  # finished without text: the finish is the first answer
            metrics.TTFT.labels(req.model, self.version).observe(time.perf_counter() - self.t0)
        metrics.E2E.labels(req.model, self.version).observe(time.perf_counter() - self.t0)
        metrics.REQUESTS.labels(req.model, req.tenant, req.method, reasons[0]).inc()
        if self.span.is_recording():
            self.span.set_attributes({
                telemetry.GEN_AI_RESPONSE_MODEL: req.model,
                telemetry.GEN_AI_USAGE_INPUT_TOKENS: first.usage.prompt_tokens,
                telemetry.GEN_AI_USAGE_OUTPUT_TOKENS: sum(
                    f.usage.completion_tokens for f in self._finished_choices.values()),
                telemetry.GEN_AI_RESPONSE_FINISH_REASONS: reasons,
                "genmesh.model_version": self.version,
                "genmesh.cached_prompt_tokens": first.usage.cached_prompt_tokens,
                "genmesh.response_cached": first.usage.response_cached})
