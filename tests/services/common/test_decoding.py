"""Requests that cannot be decoded end INVALID_ARGUMENT on every server ``new_server``
makes, in each of the four call shapes, with or without the tracing interceptors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from genmesh.v1 import generation_pb2
from services.common.decoding import DecodeRequests, Undecodable, decoding
from services.common.server import new_server

SERVICE = "test.Decoding"
GOOD = generation_pb2.JobRef(job_id="job-1").SerializeToString()
BAD_UTF8 = b"\x0a\x03a\xffb"  # field 1 (job_id), 3 bytes that are not UTF-8
TRUNCATED = GOOD[:-2]  # the length says 5 bytes, 3 follow
PARSE_ERROR = "Error parsing message with type 'genmesh.v1.JobRef'"
REASONS = {BAD_UTF8: f"{PARSE_ERROR}: String field had bad UTF-8",
           TRUNCATED: f"{PARSE_ERROR}: Wire format was corrupt"}


def details(payload: bytes) -> str:
    return (f"the request message cannot be decoded ({REASONS[payload]}): a field holds "
            "invalid UTF-8, or the message is truncated or corrupt")


class Passthrough(grpc.aio.ServerInterceptor):
    """Stands for the tracing interceptors: with any, new_server adds the stream-closing
    ones, which turn stream handlers into coroutines that write."""

    async def intercept_service(self, continuation, handler_call_details):
        return await continuation(handler_call_details)


async def unary(request: generation_pb2.JobRef, context) -> generation_pb2.Job:
    return generation_pb2.Job(job_id=request.job_id)


async def server_stream(request: generation_pb2.JobRef, context
                        ) -> AsyncIterator[generation_pb2.Job]:
    for _ in range(2):
        yield generation_pb2.Job(job_id=request.job_id)


async def client_stream(requests: AsyncIterator[generation_pb2.JobRef], context
                        ) -> generation_pb2.Job:
    return generation_pb2.Job(job_id=",".join([r.job_id async for r in requests]))


async def bidi(requests: AsyncIterator[generation_pb2.JobRef], context
               ) -> AsyncIterator[generation_pb2.Job]:
    async for r in requests:
        yield generation_pb2.Job(job_id=r.job_id)


def handlers() -> grpc.GenericRpcHandler:
    kw = {"request_deserializer": generation_pb2.JobRef.FromString,
          "response_serializer": generation_pb2.Job.SerializeToString}
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, **kw),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, **kw),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, **kw),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, **kw)})


async def calls(make_server: Callable[[], grpc.aio.Server], payloads: list[bytes]
                ) -> dict[str, tuple[object, ...]]:
    """Each shape called with ``payloads`` (one, or each message of a request stream):
    (code, details, job ids received) per shape."""
    server = make_server()
    server.add_generic_rpc_handlers([handlers()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    out: dict[str, tuple[object, ...]] = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            def method(shape: str, kind: str) -> Any:
                return getattr(channel, kind)(f"/{SERVICE}/{shape}",
                                              request_serializer=lambda b: b,
                                              response_deserializer=generation_pb2.Job.FromString)
            for shape, kind in (("Unary", "unary_unary"), ("ServerStream", "unary_stream"),
                                ("ClientStream", "stream_unary"), ("Bidi", "stream_stream")):
                received: list[str] = []
                try:
                    if kind == "unary_unary":
                        received.append((await method(shape, kind)(payloads[0])).job_id)
                    elif kind == "unary_stream":
                        received += [j.job_id async for j in method(shape, kind)(payloads[0])]
                    elif kind == "stream_unary":
                        received.append((await method(shape, kind)(iter(payloads))).job_id)
                    else:
                        received += [j.job_id async for j in method(shape, kind)(iter(payloads))]
                    out[shape] = (grpc.StatusCode.OK, "", received)
                except grpc.aio.AioRpcError as exc:
                    out[shape] = (exc.code(), exc.details(), received)
    finally:
        await server.stop(None)
    return out


@pytest.mark.parametrize("make_server", [new_server, lambda: new_server([Passthrough()])],
                         ids=["plain", "traced"])
@pytest.mark.parametrize("payload", [BAD_UTF8, TRUNCATED], ids=["bad-utf8", "truncated"])
def test_an_undecodable_request_is_invalid_argument_in_every_call_shape(make_server, payload):
    results = asyncio.run(calls(make_server, [payload]))
    assert results == {shape: (grpc.StatusCode.INVALID_ARGUMENT, details(payload), [])
                       for shape in ("Unary", "ServerStream", "ClientStream", "Bidi")}


@pytest.mark.parametrize("make_server", [new_server, lambda: new_server([Passthrough()])],
                         ids=["plain", "traced"])
def test_good_requests_pass_and_a_stream_is_served_up_to_its_bad_message(make_server):
    results = asyncio.run(calls(make_server, [GOOD, GOOD, BAD_UTF8, GOOD]))
    assert results["Unary"] == (grpc.StatusCode.OK, "", ["job-1"])
    assert results["ServerStream"] == (grpc.StatusCode.OK, "", ["job-1", "job-1"])
    refused = grpc.StatusCode.INVALID_ARGUMENT, details(BAD_UTF8)
    assert results["ClientStream"] == (*refused, [])
    # The replies to the two good messages may or may not leave before the status.
    code, message, received = results["Bidi"]
    assert (code, message) == refused and received in ([], ["job-1"], ["job-1", "job-1"])


def test_the_deserializer_returns_what_it_refused_instead_of_raising():
    decode = decoding(generation_pb2.JobRef.FromString)
    assert decode is not None
    assert decode(GOOD) == generation_pb2.JobRef(job_id="job-1")
    refused = decode(TRUNCATED)
    assert refused == Undecodable(REASONS[TRUNCATED])
    assert decoding(None) is None
    assert Undecodable("x" * 1000).details.count("x") == 200  # the reason is bounded


def test_the_interceptor_runs_outermost_on_every_server(monkeypatch):
    made: list[list[object]] = []
    monkeypatch.setattr(grpc.aio, "server", lambda **kw: made.append(kw["interceptors"]))
    new_server()
    new_server([Passthrough()])
    plain, traced = made
    assert [type(i) for i in plain] == [DecodeRequests]
    assert isinstance(traced[0], DecodeRequests) and len(traced) == 4
