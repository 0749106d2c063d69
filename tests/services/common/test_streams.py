"""Response streams end inside their own call (``services/common/streams.py``): a traced
stream cancelled by its caller or its deadline closes its generator in the call's task,
ends its server span, and leaves no "Failed to detach context" behind.

The handlers stream without awaiting anything of their own, so a cancellation always
lands while grpc sends a message, outside the generator: the case grpc leaves to the
event loop's async-generator finalizer."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.server import new_server
from services.common.telemetry import Telemetry, TelemetrySettings

SERVICE = "genmesh.test.Streams"
TRACEPARENT = ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")


@dataclass
class Handlers:
    """Endless streams that note the task each one started and ended in."""

    started_in: list[asyncio.Task | None] = field(default_factory=list)
    ended_in: list[asyncio.Task | None] = field(default_factory=list)

    async def endless(self, request: bytes, context: grpc.aio.ServicerContext
                      ) -> AsyncGenerator[bytes, None]:
        self.started_in.append(asyncio.current_task())
        try:
            while True:
                yield b"x" * 16
        finally:
            self.ended_in.append(asyncio.current_task())

    async def endless_bidi(self, requests: AsyncIterator[bytes],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async with contextlib.aclosing(self.endless(b"", context)) as replies:
            async for reply in replies:
                yield reply



async def run_calls(make_server: Callable[[], grpc.aio.Server], handlers: Handlers, *,
                    num_calls: int) -> None:
    """On a server from ``make_server``, ``num_calls`` each of: a stream cancelled after 3
    messages, one past its deadline, a bidi stream cancelled after 3 messages."""
    server = make_server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Endless": grpc.unary_stream_rpc_method_handler(handlers.endless),
        "EndlessBidi": grpc.stream_stream_rpc_method_handler(handlers.endless_bidi),
    })])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            endless = channel.unary_stream(f"/{SERVICE}/Endless")
            bidi = channel.stream_stream(f"/{SERVICE}/EndlessBidi")
            for _ in range(num_calls):
                for call in (endless(b"", metadata=(TRACEPARENT,)),
                             bidi(iter([b"go"]), metadata=(TRACEPARENT,))):
                    num_read = 0
                    async for _ in call:
                        num_read += 1
                        if num_read == 3:
                            call.cancel()
                            break
                late = endless(b"", metadata=(TRACEPARENT,), timeout=0.05)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in late:
                        pass
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for _ in range(100):  # every cancelled call has ended on the server
                if len(handlers.ended_in) == 3 * num_calls:
                    break
                await asyncio.sleep(0.01)
            gc.collect()  # what grpc left suspended is finalized now
            await asyncio.sleep(0.05)
    finally:
        await server.stop(None)


def traced() -> tuple[Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Telemetry(TelemetrySettings("test", otlp_endpoint="unused"), provider), exporter


def test_cancelled_traced_streams_end_in_their_call_without_context_errors(otel_errors):
    telemetry, exporter = traced()
    handlers = Handlers()
    asyncio.run(run_calls(lambda: new_server(telemetry.server_interceptors()), handlers,
                          num_calls=5))
    assert [r.getMessage() for r in otel_errors] == []
    assert len(handlers.ended_in) == len(handlers.started_in) == 15
    # Each ended in the task of its own call (the calls overlap: in another order).
    assert {id(t) for t in handlers.ended_in} == {id(t) for t in handlers.started_in}
    assert len({id(t) for t in handlers.started_in}) == 15
    spans = exporter.get_finished_spans()
    assert len(spans) == 15  # every call's server span ended
    assert {s.context.trace_id for s in spans if s.name.endswith("Endless")} == {
        int(TRACEPARENT[1].split("-")[1], 16)}  # under the caller's trace


def test_without_it_grpc_leaves_cancelled_streams_to_the_finalizer(otel_errors):
    """The failure it prevents: behind the tracing interceptor alone, the streams end in
    tasks of their own, where OpenTelemetry cannot detach their contexts."""
    telemetry, _ = traced()
    handlers = Handlers()
    asyncio.run(run_calls(lambda: grpc.aio.server(interceptors=telemetry.server_interceptors()),
                          handlers, num_calls=3))
    assert "Failed to detach context" in {r.getMessage() for r in otel_errors}
    assert not {id(t) for t in handlers.ended_in} <= {id(t) for t in handlers.started_in}


def test_unary_and_coroutine_stream_handlers_are_left_as_they_are():
    async def written(request: bytes, context: grpc.aio.ServicerContext) -> None:
        for _ in range(3):
            await context.write(b"w")

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def calls() -> tuple[list[bytes], bytes]:
        server = new_server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
            "Written": grpc.unary_stream_rpc_method_handler(written),
            "Echo": grpc.unary_unary_rpc_method_handler(echo)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stream = [m async for m in channel.unary_stream(f"/{SERVICE}/Written")(b"")]
                return stream, await channel.unary_unary(f"/{SERVICE}/Echo")(b"hi")
        finally:
            await server.stop(None)

    assert asyncio.run(calls()) == ([b"w"] * 3, b"hi")
