"""The worker's part of a request's trace: GenAI attributes on the Generate server span
(which the gRPC interceptor started and made current), and one child span per engine
stage (``queue``, ``prefill``, ``decode``) drawn from the engine's own timings.

Only ids, counts and settings go into spans, never prompt or output text. Callers check
``span.is_recording()`` first, so nothing here runs while tracing is off.
"""

from __future__ import annotations

import time

from opentelemetry import trace

from services.common import telemetry
from services.worker.engine.outputs import Delta, RequestTimings
from services.worker.engine.params import SamplingParams

_tracer = telemetry.tracer(__name__)

MODEL_VERSION = "genmesh.model_version"
CACHED_PROMPT_TOKENS = "genmesh.cached_prompt_tokens"
DEVICE_SECONDS = "genmesh.device_seconds"
OPERATION = "text_completion"  # the worker continues token ids; chat templating is upstream


def describe_request(span: trace.Span, *, model: str, version: str,
                     params: SamplingParams) -> None:
    span.set_attributes({
        telemetry.GEN_AI_SYSTEM: telemetry.SYSTEM,
        telemetry.GEN_AI_OPERATION: OPERATION,
        telemetry.GEN_AI_REQUEST_MODEL: model,
        telemetry.GEN_AI_REQUEST_MAX_TOKENS: params.max_tokens,
        telemetry.GEN_AI_REQUEST_TEMPERATURE: params.temperature,
        MODEL_VERSION: version,
    })


def record_finish(span: trace.Span, last: Delta) -> None:
    """Usage and finish reason on ``span``, and the stage spans under it."""
    if last.finish_reason is not None:
        span.set_attribute(telemetry.GEN_AI_RESPONSE_FINISH_REASONS, [last.finish_reason.value])
    if last.usage is not None:
        span.set_attributes({
            telemetry.GEN_AI_USAGE_INPUT_TOKENS: last.usage.prompt_tokens,
            telemetry.GEN_AI_USAGE_OUTPUT_TOKENS: last.usage.completion_tokens,
            CACHED_PROMPT_TOKENS: last.usage.cached_prompt_tokens,
        })
    if last.error:  # engine failures only; their messages never quote the request
        span.set_status(trace.Status(trace.StatusCode.ERROR, last.error))
    if last.timings is not None:
        span.set_attribute(DEVICE_SECONDS, last.timings.device_seconds)
        record_stages(span, last.timings)


def record_stages(parent: trace.Span, timings: RequestTimings) -> None:
    """Three consecutive child spans covering arrival to finish. The engine's times are
    monotonic; one offset, taken now, maps them to the epoch (a clock step during the
    request shifts the spans a little but never reorders them)."""
    offset_ns = time.time_ns() - time.monotonic_ns()

    def epoch_ns(monotonic_s: float) -> int:
        return round(monotonic_s * 1e9) + offset_ns

    context = trace.set_span_in_context(parent)
    start = timings.arrival_time
    for name, duration_s in (("queue", timings.queue_s), ("prefill", timings.prefill_s),
                             ("decode", timings.decode_s)):
        span = _tracer.start_span(name, context=context, start_time=epoch_ns(start))
        span.end(end_time=epoch_ns(start + duration_s))
        start += duration_s
