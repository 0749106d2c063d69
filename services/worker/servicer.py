"""The Worker gRPC service: translates protos to engine calls and errors to status codes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from genmesh.core import metadata
from genmesh.core.records import GenerationRecord
from genmesh.core.sampling import DEFAULT_MAX_TOKENS
from genmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.worker import tracing
from services.worker.engine.api import Engine
from services.worker.engine.outputs import Delta, FinishReason, merge_deltas
from services.worker.engine.params import (
    Constraint,
    ConstraintKind,
    InvalidRequestError,
    Priority,
    SamplingParams,
)
from services.worker.metrics import WorkerMetrics
from services.worker.records import RecordSink, Timing
from services.worker.stream_interval import ReplyGate, StreamInterval

log = logging.getLogger("genmesh.worker")

_FINISH = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}
_PRIORITY = {
    common_pb2.PRIORITY_UNSPECIFIED: Priority.NORMAL,
    common_pb2.PRIORITY_INTERACTIVE: Priority.INTERACTIVE,
    common_pb2.PRIORITY_NORMAL: Priority.NORMAL,
    common_pb2.PRIORITY_BATCH: Priority.BATCH,
}


def params_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    """Proto zero values mean the defaults (see common.proto)."""
    return SamplingParams(
        max_tokens=DEFAULT_MAX_TOKENS if p.max_tokens == 0 else p.max_tokens,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p or 1.0,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty or 1.0,
        seed=p.seed if p.HasField("seed") else None,
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        logit_bias=tuple(sorted(p.logit_bias.items())),
        min_tokens=p.min_tokens,
        constraint=constraint_from_proto(p.constraint) if p.HasField("constraint") else None,
        speculative=p.speculative if p.HasField("speculative") else None,
    )


def constraint_from_proto(c: common_pb2.Constraint) -> Constraint | None:
    """None when no kind is set (an empty Constraint means free text)."""
    kind = c.WhichOneof("kind")
    if kind == "json_object":
        return Constraint(ConstraintKind.JSON_OBJECT)
    if kind == "json_schema":
        strict = c.json_schema.strict if c.json_schema.HasField("strict") else True
        return Constraint(ConstraintKind.JSON_SCHEMA, c.json_schema.schema, strict=strict)
    if kind == "regex":
        return Constraint(ConstraintKind.REGEX, c.regex)
    if kind == "grammar":
        return Constraint(ConstraintKind.GRAMMAR, c.grammar)
    return None


def delta_to_proto(d: Delta) -> worker_pb2.WorkerGenerateResponse:
    msg = worker_pb2.WorkerGenerateResponse(token_ids=d.new_token_ids)
    for lp in d.logprobs or []:
        msg.logprobs.add(token_id=lp.token_id, logprob=lp.logprob,
                         top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
    if d.finish_reason is not None:
        msg.finish_reason = _FINISH[d.finish_reason]
    if d.usage is not None:
        msg.usage.CopyFrom(common_pb2.Usage(
            prompt_tokens=d.usage.prompt_tokens, completion_tokens=d.usage.completion_tokens,
            cached_prompt_tokens=d.usage.cached_prompt_tokens))
    if d.error:
        msg.error = d.error
    return msg


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: Engine, *, model_name: str, model_version: str,
                 worker_id: str = "", records: RecordSink | None = None,
                 metrics: WorkerMetrics | None = None,
                 stream_interval: StreamInterval | None = None) -> None:
        self.engine = engine
        self.stream_interval = stream_interval or StreamInterval(max_interval=1)
        self.model_name = model_name
        self.model_version = model_version
        self.worker_id = worker_id  # this replica's address, sent back to callers
        self.records = records  # None: finished generations are not recorded
        self.metrics = metrics  # None: no Prometheus endpoint

    async def Generate(self, request: worker_pb2.WorkerGenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        timing = Timing()
        params = params_from_proto(request.params)
        span = trace.get_current_span()  # the interceptor's server span (or a no-op one)
        if span.is_recording():
            tracing.describe_request(span, model=self.model_name, version=self.model_version,
                                     params=params)
        try:
            stream = self.engine.submit(
                list(request.prompt_ids), params,
                request_id=request.request_id or None,
                priority=_PRIORITY.get(request.priority, Priority.NORMAL),
                cache_salt=request.cache_salt)
        except InvalidRequestError as exc:
            # An empty request_id gets a fresh one, so a request_id error is a duplicate.
            code = (grpc.StatusCode.ALREADY_EXISTS if exc.field == "request_id"
                    else grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(code, str(exc))
        except RuntimeError as exc:  # shut down
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        token_ids: list[int] = []
        # The native engines' streams can hand over what is already waiting; others
        # (TensorRT-LLM) deliver one delta at a time.
        take_ready = getattr(stream, "take_ready", list)
        try:
            # Tells the caller which version (and replica) answered before the first token.
            await context.send_initial_metadata(((metadata.MODEL_VERSION, self.model_version),
                                                 (metadata.WORKER_ID, self.worker_id)))
            gate = ReplyGate(self.stream_interval, self._num_running)
            async for first in stream:
                # Deltas that piled up while the last reply was being sent go out as one;
                # under load, a few steps' tokens go out as one (stream_interval.py).
                due = gate.add([first, *take_ready()])
                if due is None:
                    continue
                delta = merge_deltas(due)
                if self.records is not None:
                    timing.tokens(len(delta.new_token_ids))
                    token_ids += delta.new_token_ids
                if delta.finished:  # before the last reply, while the server span is open
                    self._observe_finish(span, delta)
                if delta.invalid_field is not None:  # the request's fault, found late
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"{delta.invalid_field}: {delta.error}")
                yield delta_to_proto(delta)
                if delta.finish_reason is FinishReason.ERROR:
                    log.error("generation failed",
                              extra={"request_id": delta.request_id, "error": delta.error})
                elif delta.finish_reason is not None and self.records is not None:
                    self.records.add(GenerationRecord(
                        request_id=request.request_id, model_version=self.model_version,
                        is_shadow=_is_shadow(context), token_ids=tuple(token_ids),
                        finish_reason=delta.finish_reason.name.lower(), ttft_ms=timing.ttft_ms,
                        decode_tokens_per_s=timing.decode_tokens_per_s))
        finally:
            # Cancelled by the caller (or the server stopping): free the KV blocks now.
            await stream.aclose()  # type: ignore[attr-defined]

    def _num_running(self) -> int:
        return self.engine.stats().num_running

    def _observe_finish(self, span: trace.Span, last: Delta) -> None:
        if self.metrics is not None and last.timings is not None:
            self.metrics.observe_finished(last.timings)
        if span.is_recording():
            tracing.record_finish(span, last)

    async def GetStats(self, request: worker_pb2.GetStatsRequest,
                       context: grpc.aio.ServicerContext) -> worker_pb2.WorkerStats:
        s = self.engine.stats()
        return worker_pb2.WorkerStats(
            model=self.model_name, model_version=self.model_version,
            num_running=s.num_running, num_waiting=s.num_waiting,
            num_kv_blocks_total=s.num_kv_blocks_total, num_kv_blocks_free=s.num_kv_blocks_free,
            num_kv_blocks_cached=s.num_kv_blocks_cached,
            prefix_cache_hit_rate=s.prefix_cache_hit_rate, num_preemptions=s.num_preemptions,
            num_steps=s.num_steps, generated_tokens=s.generated_tokens,
            mean_batch_size=s.mean_batch_size, mean_step_ms=s.mean_step_ms,
            max_model_len=self.engine.max_model_len)


def _is_shadow(context: grpc.aio.ServicerContext) -> bool:
    return dict(context.invocation_metadata() or ()).get(metadata.SHADOW) == "1"
