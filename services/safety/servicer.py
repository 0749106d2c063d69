"""The Safety service: translates protos to the guard's calls and its decisions back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from genmesh.v1 import safety_pb2, safety_pb2_grpc
from services.safety import metrics
from services.safety.batcher import CheckerClosedError
from services.safety.checker import Finding
from services.safety.guard import Guard, ModerationStream, UnknownTenantError
from services.safety.policy import Action

VERDICTS = {Action.ALLOW: safety_pb2.VERDICT_ALLOW, Action.REDACT: safety_pb2.VERDICT_REDACT,
            Action.BLOCK: safety_pb2.VERDICT_BLOCK}


def finding_pb(f: Finding) -> safety_pb2.Finding:
    return safety_pb2.Finding(category=f.category, scanner=f.scanner, score=f.score,
                              action=VERDICTS[f.action])


class SafetyServicer(safety_pb2_grpc.SafetyServicer):
    def __init__(self, guard: Guard, *, max_text_chars: int) -> None:
        self.guard = guard
        self.max_text_chars = max_text_chars

    async def CheckPrompt(self, request: safety_pb2.CheckPromptRequest,
                          context: grpc.aio.ServicerContext) -> safety_pb2.CheckResult:
        if not request.text.strip():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text is empty")
        if len(request.text) > self.max_text_chars:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"text has {len(request.text)} characters; at most "
                                f"{self.max_text_chars} are checked (the safety service's "
                                "--max-text-chars)")
        try:
            with metrics.CHECK_SECONDS.labels("prompt").time():
                decision = await self.guard.check_prompt(request_id=request.request_id,
                                                         tenant=request.tenant, text=request.text)
        except UnknownTenantError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except TimeoutError:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "the safety check did not finish in time (the service is "
                                "overloaded); retry shortly")
        except CheckerClosedError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return safety_pb2.CheckResult(
            verdict=VERDICTS[decision.action],
            redacted_text=decision.text if decision.action == Action.REDACT else "",
            findings=[finding_pb(f) for f in decision.findings], reason=decision.reason)

    async def Moderate(self, request_iterator: AsyncIterator[safety_pb2.ModerateRequest],
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[safety_pb2.ModerateResponse]:
        stream: ModerationStream | None = None
        num_chars = 0
        async for msg in request_iterator:
            if stream is None:
                try:
                    stream = self.guard.open_stream(request_id=msg.request_id,
                                                    tenant=msg.tenant)
                except UnknownTenantError as exc:
                    await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            assert stream is not None  # abort() raised otherwise
            num_chars += len(msg.text)
            if num_chars > self.max_text_chars:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the stream passed {self.max_text_chars} characters "
                                    "(the safety service's --max-text-chars)")
            with metrics.CHECK_SECONDS.labels("output").time():
                release = stream.flush(msg.text) if msg.flush else stream.feed(msg.text)
            if release.blocked is not None:
                yield safety_pb2.ModerateResponse(
                    text=release.text, verdict=safety_pb2.VERDICT_BLOCK,
                    findings=[finding_pb(f) for f in release.findings],
                    reason=release.blocked.category, num_input_chars=release.num_raw_chars)
                return
            redacted = any(f.action == Action.REDACT for f in release.findings)
            yield safety_pb2.ModerateResponse(
                text=release.text,
                verdict=safety_pb2.VERDICT_REDACT if redacted else safety_pb2.VERDICT_ALLOW,
                findings=[finding_pb(f) for f in release.findings],
                num_input_chars=release.num_raw_chars)
            if msg.flush:
                return
