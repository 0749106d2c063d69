"""Traces and metrics, the same way in every service.

Traces: OpenTelemetry, exported over OTLP/gRPC to ``otlp_endpoint`` when one is set. The
gRPC interceptors of ``opentelemetry-instrumentation-grpc`` carry the W3C trace context
in call metadata, so a request is one trace from Envoy's edge through every process it
touches; services add spans for their stages (``tracer(__name__)``). With no endpoint,
nothing is installed: the tracer is OpenTelemetry's no-op and costs a function call.

Metrics: ``prometheus_client``'s registry, served on ``metrics_port`` (0: not served).
Each service declares its own series in its ``metrics.py``; names carry the ``genmesh_``
prefix and follow what operators of vLLM and Triton know.

Span attributes follow OpenTelemetry's GenAI conventions (``gen_ai.*``) and never hold
prompt or output text.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
import prometheus_client
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import (
    aio_client_interceptors,
    aio_server_interceptor,
    filters,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from genmesh.core.config import ServerConfig
from services.common.tls import MeshTls

log = logging.getLogger("genmesh.telemetry")

# Not traced: health checks (Envoy asks every second), reflection, and Chat sessions,
# which can last an hour (each turn gets a span of its own instead).
_UNTRACED = filters.negate(filters.any_of(
    filters.health_check(), filters.service_prefix("grpc.reflection"),
    filters.full_method_name("/genmesh.v1.Generation/Chat")))

# Streams a caller ends early (a stop string, a cancel): the client interceptor would end
# their spans only when the stream is drained, so they would never be sent. Calls to them
# carry the caller's current context instead (``trace_metadata``).
_CALLER_TRACED = filters.negate(filters.any_of(
    filters.full_method_name("/genmesh.v1.Worker/Generate"),
    filters.full_method_name("/genmesh.v1.Tokenizer/Detokenize"),
    filters.full_method_name("/genmesh.v1.Safety/Moderate")))

# GenAI semantic conventions (opentelemetry.io/docs/specs/semconv/gen-ai/).
GEN_AI_SYSTEM = "gen_ai.system"
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
SYSTEM = "genmesh"


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    service: str  # service.name of the spans, e.g. "genmesh-frontend"
    otlp_endpoint: str = ""  # host:port of an OTLP/gRPC trace collector; "": no traces
    trace_sample_ratio: float = 1.0  # share of new traces kept (a caller's choice wins)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0  # the Prometheus endpoint; 0: none


def settings_from(service: str, cfg: ServerConfig) -> TelemetrySettings:
    return TelemetrySettings(service=service, otlp_endpoint=cfg.otlp_endpoint,
                             trace_sample_ratio=cfg.trace_sample_ratio,
                             metrics_host=cfg.host, metrics_port=cfg.metrics_port)


class Telemetry:
    """What ``setup`` installed: interceptors for servers and channels, and a flush."""

    def __init__(self, settings: TelemetrySettings, provider: TracerProvider | None) -> None:
        self.settings = settings
        self.provider = provider

    @property
    def is_tracing(self) -> bool:
        return self.provider is not None

    def server_interceptors(self) -> Sequence[grpc.aio.ServerInterceptor]:
        if self.provider is None:
            return ()
        return (aio_server_interceptor(tracer_provider=self.provider, filter_=_UNTRACED),)

    def channel(self, address: str, tls: MeshTls | None = None) -> grpc.aio.Channel:
        """A channel whose calls carry the current trace context: mutual TLS to Envoy
        with ``tls`` (``tls.py``), else plaintext."""
        interceptors = (None if self.provider is None else aio_client_interceptors(
            tracer_provider=self.provider, filter_=_CALLER_TRACED))
        if tls is None:
            return grpc.aio.insecure_channel(address, interceptors=interceptors)
        return grpc.aio.secure_channel(address, tls.channel_credentials(),
                                       options=tls.channel_options(),
                                       interceptors=interceptors)

    def shutdown(self) -> None:
        """Send the spans still buffered (at most a few seconds)."""
        if self.provider is not None:
            self.provider.shutdown()

    async def flush(self) -> None:
        """``shutdown`` as a server's on_stop callback."""
        self.shutdown()

    def flush_after(self, on_stop: Callable[[], Awaitable[None]]
                    ) -> Callable[[], Awaitable[None]]:
        """A server's on_stop callback: ``on_stop``, then ``shutdown``."""
        async def stop() -> None:
            try:
                await on_stop()
            finally:
                self.shutdown()
        return stop


def setup(settings: TelemetrySettings) -> Telemetry:
    """Install tracing (when an endpoint is set) and start the metrics endpoint (when a
    port is set). Call once, at the entry point, before making servers or channels."""
    provider = None
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service}),
            sampler=ParentBased(TraceIdRatioBased(settings.trace_sample_ratio)))
        provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=True),
            schedule_delay_millis=500))
        trace.set_tracer_provider(provider)
    if settings.metrics_port:
        prometheus_client.start_http_server(settings.metrics_port, addr=settings.metrics_host)
    log.info("telemetry", extra={"service": settings.service,
                                 "otlp_endpoint": settings.otlp_endpoint or "off",
                                 "metrics_port": settings.metrics_port or "off"})
    return Telemetry(settings, provider)


class FollowedTotal:
    """A Prometheus counter that follows a running total kept elsewhere (an engine's, a
    store's, a servicer's): each ``follow`` adds what the total grew since the last."""

    def __init__(self, counter: prometheus_client.Counter) -> None:
        self._counter = counter
        self._last = 0.0

    def follow(self, total: float) -> None:
        self._counter.inc(max(0.0, total - self._last))
        self._last = max(self._last, total)


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The current span's W3C context as call metadata (empty while tracing is off), for
    the streaming calls the client interceptor leaves to their caller."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


def tracer(name: str) -> trace.Tracer:
    """The tracer for a module's stage spans (a no-op one while tracing is off)."""
    return trace.get_tracer(name)
