"""Errors → gRPC status codes, in one place: the mapping, the decorator on unary and
streaming handlers, and that every rpc of the public API goes through it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import grpc
import pytest

from genmesh.v1 import generation_pb2
from services.frontend.errors import PipelineError
from services.frontend.jobs import InvalidJobId, JobConflict, JobStoreUnavailable, WatchTimeout
from services.frontend.servicer import GenerationServicer
from services.frontend.status import maps_errors, status_of


class Aborted(Exception):
    """What grpc's abort raises, in these tests."""


class FakeContext:
    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None
        self.trailers: tuple[tuple[str, str], ...] = ()

    async def abort(self, code: grpc.StatusCode, details: str,
                    trailing_metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.status = (code, details)
        self.trailers = trailing_metadata
        raise Aborted


@pytest.mark.parametrize(("error", "status"), [
    (PipelineError(grpc.StatusCode.NOT_FOUND, "no model 'x'"),
     (grpc.StatusCode.NOT_FOUND, "no model 'x'")),
    (JobStoreUnavailable("the job store failed while reading a job: down"),
     (grpc.StatusCode.UNAVAILABLE, "the job store is unavailable (the job store failed while "
                                   "reading a job: down); retry shortly")),
    (JobConflict("job id 'a' is already used"),
     (grpc.StatusCode.ALREADY_EXISTS, "job id 'a' is already used")),
    (InvalidJobId("a job id must have 1 to 128 characters, got 0"),
     (grpc.StatusCode.INVALID_ARGUMENT, "a job id must have 1 to 128 characters, got 0")),
    (WatchTimeout("job 'a' did not end within 1 s"),
     (grpc.StatusCode.DEADLINE_EXCEEDED,
      "the job did not end within the call's deadline; watch again")),
    (ValueError("a bug"), None),
    (TimeoutError("a bug"), None),
])
def test_status_of(error, status):
    assert status_of(error) == status


class Servicer:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.is_closed = False

    @maps_errors
    async def Unary(self, request: str, context: FakeContext) -> str:
        if request == "fail":
            raise self.error
        return request.upper()

    @maps_errors
    async def Streaming(self, request: str, context: FakeContext
                        ) -> AsyncGenerator[str, None]:
        try:
            yield "first"
            if request == "fail":
                raise self.error
            yield "second"
        finally:
            self.is_closed = True


def test_a_unary_handler_answers_or_aborts_with_the_status_of_its_error():
    servicer, context = Servicer(PipelineError(grpc.StatusCode.NOT_FOUND, "gone")), FakeContext()
    assert asyncio.run(servicer.Unary("ok", context)) == "OK"
    with pytest.raises(Aborted):
        asyncio.run(servicer.Unary("fail", context))
    assert context.status == (grpc.StatusCode.NOT_FOUND, "gone")


def test_a_status_message_is_cut_to_a_size_a_trailer_can_carry():
    message = "x" * 100_000  # say, a downstream service quoting a caller's string
    servicer, context = Servicer(PipelineError(grpc.StatusCode.INTERNAL, message)), FakeContext()
    with pytest.raises(Aborted):
        asyncio.run(servicer.Unary("fail", context))
    assert context.status == (grpc.StatusCode.INTERNAL, "x" * 2047 + "…")


def test_a_streaming_handler_streams_then_aborts_with_the_status_of_its_error():
    servicer, context = Servicer(JobConflict("taken")), FakeContext()
    seen = []

    async def consume() -> None:
        async for reply in servicer.Streaming("fail", context):
            seen.append(reply)

    with pytest.raises(Aborted):
        asyncio.run(consume())
    assert seen == ["first"]
    assert context.status == (grpc.StatusCode.ALREADY_EXISTS, "taken")
    assert servicer.is_closed


def test_a_bug_is_raised_on_not_mapped():
    servicer, context = Servicer(KeyError("bug")), FakeContext()
    with pytest.raises(KeyError):
        asyncio.run(servicer.Unary("fail", context))
    assert context.status is None


def test_leaving_a_stream_early_closes_the_handler():
    servicer = Servicer(KeyError("bug"))

    async def first_only() -> str:
        replies = servicer.Streaming("ok", FakeContext())
        first = await anext(replies)
        await replies.aclose()
        return first

    assert asyncio.run(first_only()) == "first"
    assert servicer.is_closed


def test_every_rpc_of_the_public_api_maps_its_errors():
    names = generation_pb2.DESCRIPTOR.services_by_name["Generation"].methods_by_name
    unwrapped = [n for n in names if not hasattr(getattr(GenerationServicer, n), "__wrapped__")]
    assert unwrapped == []


@pytest.mark.parametrize(("retry_after_s", "trailers"), [
    (None, ()), (0.2, (("retry-after", "1"),)), (2.01, (("retry-after", "3"),))])
def test_a_refusal_that_says_when_to_retry_sends_retry_after(retry_after_s, trailers):
    error = PipelineError(grpc.StatusCode.RESOURCE_EXHAUSTED, "budget spent",
                          retry_after_s=retry_after_s)
    context = FakeContext()
    with pytest.raises(Aborted):
        asyncio.run(Servicer(error).Unary("fail", context))
    assert context.status == (grpc.StatusCode.RESOURCE_EXHAUSTED, "budget spent")
    assert context.trailers == trailers


def test_a_token_budget_refusal_names_its_limit_in_the_trailers():
    error = PipelineError(grpc.StatusCode.RESOURCE_EXHAUSTED, "budget spent",
                          retry_after_s=11.2, rate_limit=(600, 13))
    context = FakeContext()
    with pytest.raises(Aborted):
        asyncio.run(Servicer(error).Unary("fail", context))
    assert context.trailers == (("retry-after", "12"), ("x-ratelimit-limit", "600"),
                                ("x-ratelimit-remaining", "13"), ("x-ratelimit-reset", "12"))
