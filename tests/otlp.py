"""A real OTLP/gRPC trace receiver for tests: services export their spans to it exactly
as they would to a collector, and tests read back what arrived.

    with OtlpReceiver() as rx:
        start_service(otlp_endpoint=rx.endpoint)
        ...
        spans = rx.wait_for(lambda spans: any(s.name == "decode" for s in spans))
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # 16 hex digits; "" for a root span
    name: str
    service: str  # the resource's service.name
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind (1 internal, 2 server, 3 client)
    start_ns: int  # since the epoch
    end_ns: int
    attributes: dict[str, object]


def _value(v: common_pb2.AnyValue) -> object:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return None if which is None else getattr(v, which)


def _attributes(kvs: Any) -> dict[str, object]:
    return {kv.key: _value(kv.value) for kv in kvs}


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, on_spans: Callable[[list[ReceivedSpan]], None]) -> None:
        self._on_spans = on_spans

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        spans = []
        for resource_spans in request.resource_spans:
            service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                spans += [ReceivedSpan(
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex(), name=s.name, service=service,
                    kind=s.kind, start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                    attributes=_attributes(s.attributes)) for s in scope_spans.spans]
        self._on_spans(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """An OTLP/gRPC trace endpoint on a free loopback port, keeping every span it gets."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._arrived = threading.Condition()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
            _TraceService(self._add), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> OtlpReceiver:
        self._server.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.stop(grace=None)

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._arrived:
            self._spans += spans
            self._arrived.notify_all()

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in arrival order (a copy)."""
        with self._arrived:
            return list(self._spans)

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool],
                 timeout_s: float = 10.0) -> list[ReceivedSpan]:
        """The spans received, once ``predicate`` holds for them; TimeoutError (naming
        what did arrive) after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while not predicate(list(self._spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    arrived = [(s.service, s.name, s.trace_id) for s in self._spans]
                    raise TimeoutError(f"spans not as expected after {timeout_s} s; "
                                       f"arrived (service, name, trace id): {arrived}")
                self._arrived.wait(left)
            return list(self._spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        """The spans of one trace, earliest start first."""
        return sorted((s for s in self.spans() if s.trace_id == trace_id),
                      key=lambda s: s.start_ns)
