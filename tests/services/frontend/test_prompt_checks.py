"""A chat's prompt checks (``SafetyGate.check_messages``): one CheckPrompt per distinct
message text, at most MAX_CHECKS_IN_FLIGHT at once, all within the one safety timeout,
and the first refusal stops the rest (so a chat running out of time cancels a few calls,
not hundreds: Envoy closes a connection on which most calls are reset early)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from genmesh.core.failure import FailureMode
from genmesh.core.models.chat_template import ChatMessage
from genmesh.v1 import safety_pb2
from services.frontend.errors import PipelineError
from services.frontend.moderation import MAX_CHECKS_IN_FLIGHT, SafetyGate, SafetySettings


class CountingSafety:
    """CheckPrompt answers after ``delay_s`` (blocks "BAD" at once), counting calls in
    flight."""

    def __init__(self, delay_s: float = 0.001) -> None:
        self.delay_s = delay_s
        self.num_in_flight = self.max_in_flight = 0
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.timeouts: list[float] = []

    async def CheckPrompt(self, request: safety_pb2.CheckPromptRequest, *, timeout: float
                          ) -> safety_pb2.CheckResult:
        self.started.append(request.text)
        self.timeouts.append(timeout)
        if "BAD" in request.text:  # refused at once
            return safety_pb2.CheckResult(verdict=safety_pb2.VERDICT_BLOCK, reason="violence")
        if "PII" in request.text:  # redacted at once
            return safety_pb2.CheckResult(verdict=safety_pb2.VERDICT_REDACT,
                                          redacted_text=request.text.replace("PII", "[pii]"))
        self.num_in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.num_in_flight)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.sleep(self.delay_s)
        except TimeoutError:
            raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(),
                                       grpc.aio.Metadata(), "Deadline Exceeded") from None
        except asyncio.CancelledError:
            self.cancelled.append(request.text)
            raise
        finally:
            self.num_in_flight -= 1
        return safety_pb2.CheckResult(verdict=safety_pb2.VERDICT_ALLOW)


def check(safety: CountingSafety, messages: list[ChatMessage], *, timeout_s: float = 2.0
          ) -> tuple[ChatMessage, ...]:
    gate = SafetyGate(safety, SafetySettings(  # type: ignore[arg-type]
        timeout_s=timeout_s, prompt_failure_mode=FailureMode.CLOSED))
    return asyncio.run(gate.check_messages(tuple(messages), first=0, request_id="r1",
                                           tenant="acme", model="m"))


def users(n: int) -> list[ChatMessage]:
    return [ChatMessage("user", f"message {i}") for i in range(n)]


def test_a_long_chat_is_checked_a_bounded_number_at_a_time():
    safety = CountingSafety()
    messages = users(200) + [ChatMessage("assistant", "not checked")]
    assert check(safety, messages) == tuple(messages)
    assert len(safety.started) == 200  # every caller message, no assistant one
    assert safety.max_in_flight == MAX_CHECKS_IN_FLIGHT == 32


def test_a_text_repeated_in_a_chat_is_checked_once():
    safety = CountingSafety()
    messages = [ChatMessage("user", "0000000000")] * 512 + [
        ChatMessage("system", "be brief"), ChatMessage("user", "be brief")]
    assert check(safety, messages) == tuple(messages)
    assert safety.started == ["0000000000", "be brief"]


def test_a_redaction_reaches_every_copy_of_a_repeated_text():
    safety = CountingSafety()
    gate = SafetyGate(safety, SafetySettings(  # type: ignore[arg-type]
        timeout_s=2.0, prompt_failure_mode=FailureMode.CLOSED))
    text = "call me, PII"
    messages = (ChatMessage("user", text),  # before ``first``: checked by an earlier turn
                ChatMessage("system", text), ChatMessage("assistant", text),
                ChatMessage("user", "hello"), ChatMessage("tool", text))
    got = asyncio.run(gate.check_messages(messages, first=1, request_id="r1", tenant="acme",
                                          model="m"))
    assert [m.content for m in got] == [text, "call me, [pii]", text, "hello",
                                        "call me, [pii]"]
    assert safety.started == [text, "hello"]


def test_the_first_refusal_stops_the_checks_not_yet_answered():
    safety = CountingSafety(delay_s=0.05)
    with pytest.raises(PipelineError) as err:
        check(safety, [ChatMessage("user", "BAD at once"), *users(200)])
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    # The refusal came in the first wave (its freed place may start one more): the rest
    # never started, and every check started but not answered was cancelled.
    assert len(safety.started) <= MAX_CHECKS_IN_FLIGHT + 1
    assert sorted(safety.cancelled) == sorted(set(safety.started) - {"BAD at once"})


def test_all_the_checks_share_one_deadline():
    safety = CountingSafety(delay_s=0.5)  # a wave per 0.5 s: 4 waves would take 2 s
    started = time.monotonic()
    with pytest.raises(PipelineError) as err:
        check(safety, users(4 * MAX_CHECKS_IN_FLIGHT), timeout_s=0.8)
    elapsed = time.monotonic() - started
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert "the prompt cannot be checked" in err.value.message
    assert elapsed < 1.5  # the settings' 0.8 s for them all, not 0.8 s each
    assert max(safety.timeouts) <= 0.8
    assert min(safety.timeouts[MAX_CHECKS_IN_FLIGHT:]) < 0.4  # the second wave's: what's left
