"""The frontend's side of the safety service: the prompt check before inference and the
moderation of the output while it streams.

A blocked prompt is refused with PERMISSION_DENIED naming the category (never the text)
and never reaches a worker. A redacted prompt replaces the original. Output text goes to
the service over one Moderate stream per generation, in lock step (each message answered
by one reply); what comes back is what the client may see.

The service being down or slower than ``timeout_s`` is handled per failure mode: closed
refuses the prompt (or ends the stream) with UNAVAILABLE; open lets it through unchecked,
logged. Nothing waits longer than ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass

import grpc

from genmesh.models.chat_template import ChatMessage
from genmesh.v1 import safety_pb2, safety_pb2_grpc
from services.common.failure import FailureMode
from services.common.telemetry import trace_metadata
from services.frontend.errors import PipelineError

log = logging.getLogger("genmesh.frontend")

# Roles whose text comes from the caller and is checked; assistant turns are the model's
# own output, already moderated when they streamed.
CHECKED_ROLES = frozenset({"user", "system"})


@dataclass(frozen=True, slots=True)
class SafetySettings:
    timeout_s: float = 2.0
    prompt_failure_mode: FailureMode = FailureMode.CLOSED
    output_failure_mode: FailureMode = FailureMode.CLOSED


@dataclass(frozen=True, slots=True)
class Moderated:
    text: str  # what the client may see now
    blocked: str = ""  # set when the output was cut: the category


def _unavailable(what: str, exc: BaseException) -> PipelineError:
    detail = (exc.details() if isinstance(exc, grpc.aio.AioRpcError)
              else f"no answer within the deadline ({type(exc).__name__})")
    return PipelineError(grpc.StatusCode.UNAVAILABLE,
                       f"the safety service is unavailable ({detail}); {what}; retry shortly")


class SafetyGate:
    def __init__(self, stub: safety_pb2_grpc.SafetyStub, settings: SafetySettings) -> None:
        self.stub = stub
        self.settings = settings

    async def check_text(self, text: str, *, request_id: str, tenant: str, model: str) -> str:
        """``text`` as it may go to the model (redacted if the policy says so); raises
        PipelineError when it is blocked or cannot be checked (fail-closed)."""
        try:
            result = await self.stub.CheckPrompt(safety_pb2.CheckPromptRequest(
                request_id=request_id, tenant=tenant, model=model, text=text),
                timeout=self.settings.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise PipelineError(exc.code(), exc.details() or "") from None
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise PipelineError(grpc.StatusCode.PERMISSION_DENIED,
                                  f"{exc.details()} (ask the operator)") from None
            if self.settings.prompt_failure_mode == FailureMode.OPEN:
                log.warning("prompt not checked: the safety service failed (fail-open)",
                            extra={"request_id": request_id, "error": str(exc.code())})
                return text
            raise _unavailable("the prompt cannot be checked", exc) from None
        if result.verdict == safety_pb2.VERDICT_BLOCK:
            raise PipelineError(grpc.StatusCode.PERMISSION_DENIED,
                              f"the prompt was refused by the safety policy ({result.reason})")
        if result.verdict == safety_pb2.VERDICT_REDACT:
            return result.redacted_text
        return text

    async def check_messages(self, messages: tuple[ChatMessage, ...], *, first: int,
                             request_id: str, tenant: str, model: str
                             ) -> tuple[ChatMessage, ...]:
        """Checks the caller's messages from index ``first`` on, concurrently; the
        conversation with redactions applied."""
        indices = [i for i in range(first, len(messages))
                   if messages[i].role in CHECKED_ROLES and messages[i].content.strip()]
        texts = await asyncio.gather(*(self.check_text(
            messages[i].content, request_id=request_id, tenant=tenant, model=model)
            for i in indices))
        out = list(messages)
        for i, text in zip(indices, texts, strict=True):
            if text != out[i].content:
                out[i] = dataclasses.replace(out[i], content=text)
        return tuple(out)

    def moderation(self, *, request_id: str, tenant: str) -> OutputModeration:
        return OutputModeration(self, request_id=request_id, tenant=tenant)


class OutputModeration:
    """One generation's Moderate stream, opened on the first text."""

    def __init__(self, gate: SafetyGate | None, *, request_id: str = "", tenant: str = ""
                 ) -> None:
        self.gate = gate  # None: no moderation (every text passes)
        self.request_id = request_id
        self.tenant = tenant
        self.call: grpc.aio.StreamStreamCall | None = None
        self.is_bypassed = gate is None  # fail-open after an error: pass text unmoderated

    async def send(self, text: str, *, final: bool) -> Moderated:
        if self.is_bypassed:
            return Moderated(text)
        if not text and not final:
            return Moderated("")
        assert self.gate is not None
        timeout_s = self.gate.settings.timeout_s
        request = safety_pb2.ModerateRequest(text=text, flush=final)
        if self.call is None:
            if final and not text:
                return Moderated("")  # nothing was generated: nothing to moderate
            # The opening message names the request and carries the first text with it.
            request.request_id, request.tenant = self.request_id, self.tenant
            self.call = self.gate.stub.Moderate(metadata=trace_metadata())
        try:
            reply = await asyncio.wait_for(self._round_trip(request), timeout_s)
        except (grpc.aio.AioRpcError, TimeoutError, EOFError) as exc:
            self.close()
            if self.gate.settings.output_failure_mode == FailureMode.OPEN:
                log.warning("output no longer moderated: the safety service failed "
                            "(fail-open)", extra={"request_id": self.request_id,
                                                  "error": type(exc).__name__})
                self.is_bypassed = True
                return Moderated(text)
            raise _unavailable("the output cannot be moderated", exc) from None
        if reply.verdict == safety_pb2.VERDICT_BLOCK:
            self.close()
            return Moderated(reply.text, blocked=reply.reason or "content_filter")
        return Moderated(reply.text)

    async def _round_trip(self, request: safety_pb2.ModerateRequest
                          ) -> safety_pb2.ModerateResponse:
        assert self.call is not None
        await self.call.write(request)
        reply = await self.call.read()
        if reply is grpc.aio.EOF:
            raise EOFError("the safety service closed the moderation stream")
        return reply

    def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
            self.call = None
