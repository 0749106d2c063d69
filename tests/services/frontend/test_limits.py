"""The size limits of a request (``services/frontend/limits.py``): exact refusals, decided
by the pipeline before any stage calls a service, and at job submission."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from genmesh.core.models.chat_template import ChatMessage
from genmesh.v1 import generation_pb2
from services.frontend.catalog import ModelCatalog
from services.frontend.config import FrontendConfig
from services.frontend.errors import PipelineError
from services.frontend.limits import DEFAULT_LIMITS, RequestLimits
from services.frontend.moderation import SafetyGate, SafetySettings
from services.frontend.pipeline import build_pipeline
from services.frontend.servicer import GenerationServicer
from tests.services.frontend.stages.fakes import (
    FakeDetokenizers,
    FakeSafety,
    FakeTokenizer,
    FakeWorker,
    request,
)

LIMITS = RequestLimits(max_chat_messages=3, max_prompt_chars=10)


def chat(*contents: str) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage("user", c) for c in contents)


def refusal(limits: RequestLimits, **fields) -> str:
    with pytest.raises(PipelineError) as err:
        limits.check(request(**fields))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return err.value.message


def test_the_defaults_fit_a_whole_chat_session_and_the_edge():
    assert (DEFAULT_LIMITS.max_chat_messages, DEFAULT_LIMITS.max_prompt_chars) == (512, 262_144)
    # A Chat session's last turn: a system prompt, the turns before it, the user's message.
    num_turns = FrontendConfig().max_session_turns
    assert DEFAULT_LIMITS.max_chat_messages == 1 + 2 * (num_turns - 1) + 1
    # At most 4 bytes a character in UTF-8: within the edge's 4 MiB.
    assert 4 * DEFAULT_LIMITS.max_prompt_chars <= 4 * 1024 * 1024


def test_a_request_at_the_limits_passes():
    LIMITS.check(request(prompt="x" * 10))
    LIMITS.check(request(prompt=None, messages=chat("abc", "def", "ghij")))


def test_too_many_messages_are_refused_naming_the_limit():
    assert refusal(LIMITS, prompt=None, messages=chat("a", "b", "c", "d")) == (
        "this chat has 4 messages; the limit is 3 (limits.max_chat_messages)")
    assert refusal(DEFAULT_LIMITS, prompt=None, messages=chat(*["hi"] * 2000)) == (
        "this chat has 2000 messages; the limit is 512 (limits.max_chat_messages)")


def test_too_many_characters_are_refused_naming_the_limit():
    assert refusal(LIMITS, prompt="x" * 11) == (
        "this prompt has 11 characters; the limit is 10 (limits.max_prompt_chars)")
    assert refusal(LIMITS, prompt=None, messages=chat("abcd", "efgh", "ijk")) == (
        "this chat's messages have 11 characters; the limit is 10 (limits.max_prompt_chars)")
    # Characters are code points, not bytes: ten 4-byte emoji are ten.
    LIMITS.check(request(prompt="😀" * 10))


def test_the_pipeline_refuses_before_any_service_is_called():
    tokenizer, safety, worker = FakeTokenizer(), FakeSafety(), FakeWorker([])
    pipeline = build_pipeline(
        tokenizer=tokenizer, worker=worker, rpc_timeout_s=1.0,  # type: ignore[arg-type]
        detokenizers=FakeDetokenizers(),  # type: ignore[arg-type]
        safety=SafetyGate(safety, SafetySettings()), limits=LIMITS)  # type: ignore[arg-type]

    async def run() -> None:
        events = pipeline.run(request(prompt=None, messages=chat(*["hi"] * 4)), timeout_s=5.0)
        async with contextlib.aclosing(events):
            async for _ in events:
                pass

    with pytest.raises(PipelineError) as err:
        asyncio.run(run())
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "(limits.max_chat_messages)" in err.value.message
    assert (tokenizer.texts, safety.checked, worker.requests) == ([], [], [])


class Refused(Exception):
    """What grpc's abort raises, in this test."""


class Context:
    """A call without metadata, recording the status it ends with."""

    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str, **_: object) -> None:
        self.status = (code, details)
        raise Refused


class Jobs:
    def __init__(self) -> None:
        self.submitted: list[str] = []

    async def submit(self, job_id: str, request: bytes, *, tenant: str) -> None:
        self.submitted.append(job_id)


def test_a_job_over_the_limits_is_refused_before_it_is_queued():
    jobs = Jobs()
    servicer = GenerationServicer(
        pipeline=build_pipeline(tokenizer=FakeTokenizer(), worker=FakeWorker([]),  # type: ignore[arg-type]
                                rpc_timeout_s=1.0, limits=LIMITS),
        catalog=ModelCatalog(model="m", versions=("v1",), tokenizer=None,  # type: ignore[arg-type]
                             worker=None, rpc_timeout_s=1.0),  # type: ignore[arg-type]
        max_generation_s=60, max_session_turns=8, jobs=jobs)  # type: ignore[arg-type]
    context = Context()
    submit = generation_pb2.SubmitJobRequest(job_id="j1", request=generation_pb2.GenerateRequest(
        prompt="x" * 11))
    with pytest.raises(Refused):
        asyncio.run(servicer.SubmitJob(submit, context))  # type: ignore[arg-type]
    assert context.status == (grpc.StatusCode.INVALID_ARGUMENT, "this prompt has 11 characters; "
                              "the limit is 10 (limits.max_prompt_chars)")
    assert jobs.submitted == []
