"""Cancelled and deadline-exceeded streams of a traced frontend: the public Generation
service in-process (every downstream a fake, moderation on), served as ``serve`` serves
it, with the tracing interceptor and stage spans recording. Whoever ends a stream, the
request's spans end and OpenTelemetry never fails to detach a context."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from genmesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc, worker_pb2
from services.common.server import new_server
from services.common.telemetry import Telemetry, TelemetrySettings
from services.frontend import chat, observe
from services.frontend.catalog import ModelCatalog
from services.frontend.moderation import SafetyGate, SafetySettings
from services.frontend.pipeline import build_pipeline
from services.frontend.servicer import GenerationServicer
from tests.services.frontend.stages.fakes import (
    FakeDetokenizers,
    FakeSafety,
    FakeTokenizer,
    tokens,
)

PARAMS = common_pb2.SamplingParams(max_tokens=100_000)


class EndlessCall:
    """A worker Generate stream without end: a message per turn of the event loop, so a
    cancellation lands as often between messages (while grpc sends one, the case grpc
    leaves to the finalizer) as inside the chain."""

    def __init__(self) -> None:
        self.is_cancelled = False

    async def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    async def __aiter__(self) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        while True:
            await asyncio.sleep(0)
            yield tokens(3)

    def cancel(self) -> bool:
        self.is_cancelled = True
        return True


class EndlessWorker:
    def __init__(self) -> None:
        self.calls: list[EndlessCall] = []

    def Generate(self, request: worker_pb2.WorkerGenerateRequest, **_: object) -> EndlessCall:
        self.calls.append(EndlessCall())
        return self.calls[-1]
TRACEPARENT = ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """Spans of the stage tracers (patched: the global provider stays untouched)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(observe, "tracer", provider.get_tracer("observe"))
    monkeypatch.setattr(chat, "tracer", provider.get_tracer("chat"))
    exporter.provider = provider  # type: ignore[attr-defined]
    return exporter


async def serve_and(calls, exporter: InMemorySpanExporter, worker: EndlessWorker) -> None:
    """Serves a frontend over fakes (traced) and runs ``calls(stub)`` against it."""
    provider = exporter.provider  # type: ignore[attr-defined]
    pipeline = build_pipeline(
        tokenizer=FakeTokenizer(), worker=worker, rpc_timeout_s=5.0,  # type: ignore[arg-type]
        detokenizers=FakeDetokenizers(),  # type: ignore[arg-type]
        safety=SafetyGate(FakeSafety(), SafetySettings()))  # type: ignore[arg-type]
    servicer = GenerationServicer(
        pipeline=pipeline, max_generation_s=60, max_session_turns=8,
        catalog=ModelCatalog(model="m", versions=("v1",), tokenizer=None,  # type: ignore[arg-type]
                             worker=None, rpc_timeout_s=5.0))  # type: ignore[arg-type]
    telemetry = Telemetry(TelemetrySettings("frontend", otlp_endpoint="unused"), provider)
    server = new_server(telemetry.server_interceptors())
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await calls(generation_pb2_grpc.GenerationStub(channel))
        for _ in range(200):  # each worker call is cancelled as its request ends
            if all(c.is_cancelled for c in worker.calls):
                break
            await asyncio.sleep(0.01)
        gc.collect()  # anything left suspended is finalized now
        await asyncio.sleep(0.05)
    finally:
        await server.stop(None)


def generate(n: int) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(prompt=f"Hello there {n}", params=PARAMS)


async def cancel_and_time_out(stub: generation_pb2_grpc.GenerationStub) -> None:
    for n in range(3):
        stream = stub.GenerateStream(generate(n), metadata=(TRACEPARENT,))
        num_read = 0
        async for _ in stream:
            num_read += 1
            if num_read == 3:
                stream.cancel()
                break
        late = stub.GenerateStream(generate(n), metadata=(TRACEPARENT,), timeout=0.05)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in late:
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_cancelled_and_late_streams_end_their_spans_without_context_errors(exporter,
                                                                           otel_errors):
    worker = EndlessWorker()
    asyncio.run(serve_and(cancel_and_time_out, exporter, worker))
    assert [r.getMessage() for r in otel_errors] == []
    assert len(worker.calls) == 6 and all(c.is_cancelled for c in worker.calls)
    spans = exporter.get_finished_spans()
    servers = {s.context.span_id: s for s in spans
               if s.name == "/genmesh.v1.Generation/GenerateStream"}
    generates = [s for s in spans if s.name == "generate"]
    assert len(servers) == 6 and len(generates) == 6  # every request's spans ended
    # Each "generate" span is a child of its call's server span, in the caller's trace.
    assert all(g.parent is not None and g.parent.span_id in servers for g in generates)
    # Every span of the requests, their per-token work too, in the caller's trace.
    assert {s.context.trace_id for s in spans} == {int(TRACEPARENT[1].split("-")[1], 16)}


def test_a_cancelled_chat_turn_ends_its_spans_without_context_errors(exporter, otel_errors):
    async def cancel_a_turn(stub: generation_pb2_grpc.GenerationStub) -> None:
        requests: asyncio.Queue[generation_pb2.ChatRequest | None] = asyncio.Queue()

        async def sent():
            while (msg := await requests.get()) is not None:
                yield msg

        session = stub.Chat(sent(), metadata=(TRACEPARENT,))
        requests.put_nowait(generation_pb2.ChatRequest(
            start=generation_pb2.StartSession(params=PARAMS)))
        requests.put_nowait(generation_pb2.ChatRequest(
            turn=generation_pb2.UserTurn(content="Tell me a story")))
        num_read = 0
        async for _ in session:
            num_read += 1
            if num_read == 4:
                session.cancel()  # the whole session, mid-turn
                break
        requests.put_nowait(None)

    worker = EndlessWorker()
    asyncio.run(serve_and(cancel_a_turn, exporter, worker))
    assert [r.getMessage() for r in otel_errors] == []
    assert len(worker.calls) == 1 and worker.calls[0].is_cancelled
    names = [s.name for s in exporter.get_finished_spans()]
    assert names.count("generate") == 1
    assert names.count("genmesh.v1.Generation/Chat turn") == 1


def test_a_stage_span_is_current_only_while_the_stream_is_awaited(exporter, otel_errors):
    """``streamed_stage``: the calls made while the next event is awaited are its
    children; the consumer between events is not; closing the stream from another task
    (another context) ends the span without a detach error."""
    tracer = observe.tracer
    seen_inside: list[trace.Span] = []

    async def events():
        for n in range(3):
            seen_inside.append(trace.get_current_span())
            yield n

    async def consume() -> tuple[list[trace.Span], asyncio.Task]:
        with tracer.start_as_current_span("request") as request:
            observer = observe.RequestObserver.__new__(observe.RequestObserver)
            stream = observer.streamed_stage("generate", events())
            seen_outside = []
            await anext(stream)
            seen_outside.append(trace.get_current_span())
            await anext(stream)
            seen_outside.append(trace.get_current_span())
            assert request in seen_outside and len(set(map(id, seen_outside))) == 1
        # Closed from a task of its own, as the event loop's finalizer would.
        closing = asyncio.get_running_loop().create_task(stream.aclose())
        await closing
        return seen_outside, closing

    asyncio.run(consume())
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"request", "generate"}
    assert spans["generate"].parent.span_id == spans["request"].context.span_id
    assert [s.get_span_context().span_id for s in seen_inside] == [
        spans["generate"].context.span_id] * 2
    assert [r.getMessage() for r in otel_errors] == []
