"""`genmesh bench tracing`: what tracing costs the mesh, measured in one run.

The same streams run through two meshes in turn, started by the launcher: one with
tracing off (the default: no exporter, the no-op tracer), one exporting every span of
Envoy and every service over OTLP/gRPC to a collector in this process that counts and
drops them. Reported: TTFT and per-token p50/p99 and tokens/s per concurrency level, and
the ratios on/off.
"""

from __future__ import annotations

from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from genmesh.bench.mesh import MeshBenchPlan, through_mesh


class CountingCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace endpoint that counts the spans it receives and drops them."""

    def __init__(self) -> None:
        self.num_spans = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        self.num_spans += sum(len(scope.spans) for rs in request.resource_spans
                              for scope in rs.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def __enter__(self) -> CountingCollector:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)


def run_tracing_bench(*, model: str, dtype: str, kv_cache_gib: float, bench: MeshBenchPlan
                      ) -> dict[str, Any]:
    off, _ = through_mesh(model, dtype, kv_cache_gib, bench)
    with CountingCollector() as collector:
        on, _ = through_mesh(model, dtype, kv_cache_gib, bench,
                             otlp_endpoint=f"127.0.0.1:{collector.port}")
        num_spans = collector.num_spans
    ratios = {c: {k: round(on[c][k] / off[c][k], 3) for k in
                  ("ttft_ms_p50", "ttft_ms_p99", "per_token_ms_p50", "tokens_per_s")}
              for c in off}
    return {"model": model, "dtype": dtype, "output_tokens": bench.output_len,
            "tracing_off": off, "tracing_on": on, "on_over_off": ratios,
            "spans_exported": num_spans}
