"""The frontend's side of the safety service: the prompt check before inference and the
moderation of the output while it streams.

A blocked prompt is refused with PERMISSION_DENIED naming the category (never the text)
and never reaches a worker. A redacted prompt replaces the original. Output text goes to
the service over one Moderate stream per generation; what comes back is what the client
may see. The service answers every message with one reply, in order, so the frontend
need not wait for a verdict before sending the next text, and releases text as the
verdicts arrive (``ModerationMode``). By default (adaptive) a piece goes at once when no
verdict is outstanding, and the pieces generated while one is are gathered into one
message, sent when it comes back (Nagle's algorithm): a message per token while the
service keeps up, fewer when it does not, and no piece waits longer than a verdict. No
text reaches the client without its verdict, and the service's hold-back bound is
unchanged.

The service being down or slower than ``timeout_s`` is handled per failure mode: closed
refuses the prompt (or ends the stream) with UNAVAILABLE; open lets it through unchecked,
logged. Nothing waits longer than ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from enum import StrEnum

import grpc

from genmesh.core.failure import FailureMode
from genmesh.core.models.chat_template import ChatMessage
from genmesh.v1 import safety_pb2, safety_pb2_grpc
from services.common.telemetry import trace_metadata
from services.frontend.errors import PipelineError

log = logging.getLogger("genmesh.frontend")

# Roles whose text comes from the caller and is checked (a tool's result too: text from
# outside, the classic way in for an injection); assistant turns are the model's own
# output, already moderated when they streamed.
CHECKED_ROLES = frozenset({"user", "system", "tool"})
# The prompt checks of one chat in flight at once (one CheckPrompt per distinct message
# text): what the safety service batches at a time. A chat that runs out of time then
# cancels at most this many calls: Envoy closes a connection on which most calls are
# reset early (its defence against rapid resets), failing every other request on it.
MAX_CHECKS_IN_FLIGHT = 32
_MIN_TIMEOUT_S = 0.001  # a call past the shared deadline fails at once (DEADLINE_EXCEEDED)


class ModerationMode(StrEnum):
    # A piece goes at once while fewer than max_in_flight messages await their verdicts;
    # pieces that come meanwhile are gathered and go as one message when a verdict comes
    # back (the final piece with them, flushed).
    ADAPTIVE = "adaptive"
    # Each piece goes to the service as it is generated; its text is released when its
    # verdict arrives.
    PIPELINED = "pipelined"
    # As pipelined, but pieces are gathered into one message for up to window_s or
    # window_chars (fewer messages, each piece later by up to window_s).
    WINDOW = "window"
    # Each piece waits for its verdict before the next is read: a round trip per piece
    # (the behaviour before pipelining; kept to measure against).
    LOCKSTEP = "lockstep"


@dataclass(frozen=True, slots=True)
class SafetySettings:
    timeout_s: float = 2.0  # longest wait for a prompt check, or for one output verdict
    prompt_failure_mode: FailureMode = FailureMode.CLOSED
    output_failure_mode: FailureMode = FailureMode.CLOSED
    moderation_mode: ModerationMode = ModerationMode.ADAPTIVE
    max_in_flight: int = 1  # ADAPTIVE: messages that may await their verdicts at once
    window_s: float = 0.02  # WINDOW: longest a piece waits for others to join it
    window_chars: int = 64  # WINDOW: a message is sent once it has this many characters

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")


@dataclass(frozen=True, slots=True)
class Piece:
    """Generated text on its way to moderation (after the stop strings)."""

    text: str  # new text since the previous piece (may be empty)
    is_final: bool = False  # the generation's last piece: moderation releases the rest


@dataclass(frozen=True, slots=True)
class Moderated:
    text: str  # what the client may see now
    blocked: str = ""  # set when the output was cut: the category
    # Characters of the text sent that ``text`` stands for (``text``'s own length but
    # where redacted; with a block, the text before its match).
    num_input_chars: int = 0
    is_redacted: bool = False  # ``text`` is not the text sent: part of it was redacted

    @classmethod
    def unchanged(cls, text: str) -> Moderated:
        """``text`` passed as it was sent."""
        return cls(text, num_input_chars=len(text))


def _unavailable(what: str, exc: BaseException) -> PipelineError:
    if isinstance(exc, grpc.aio.AioRpcError):
        detail = exc.details() or exc.code().name
    elif isinstance(exc, TimeoutError):
        detail = "no answer within the deadline"
    else:  # written to or read from a stream that had ended
        detail = f"the moderation stream ended ({type(exc).__name__})"
    return PipelineError(grpc.StatusCode.UNAVAILABLE,
                       f"the safety service is unavailable ({detail}); {what}; retry shortly")


class SafetyGate:
    def __init__(self, stub: safety_pb2_grpc.SafetyStub, settings: SafetySettings) -> None:
        self.stub = stub
        self.settings = settings

    async def check_text(self, text: str, *, request_id: str, tenant: str, model: str,
                         timeout_s: float | None = None) -> str:
        """``text`` as it may go to the model (redacted if the policy says so); raises
        PipelineError when it is blocked or cannot be checked (fail-closed) within
        ``timeout_s`` (default: the settings')."""
        try:
            result = await self.stub.CheckPrompt(safety_pb2.CheckPromptRequest(
                request_id=request_id, tenant=tenant, model=model, text=text),
                timeout=self.settings.timeout_s if timeout_s is None else timeout_s)
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
        """Checks the caller's messages from index ``first`` on, at most
        MAX_CHECKS_IN_FLIGHT at a time and all within the settings' ``timeout_s``; the
        conversation with redactions applied. A text sent in several messages is checked
        once (its verdict is the same). The first message refused stops the rest."""
        contents = list(dict.fromkeys(
            messages[i].content for i in range(first, len(messages))
            if messages[i].role in CHECKED_ROLES and messages[i].content.strip()))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.timeout_s
        in_flight = asyncio.Semaphore(MAX_CHECKS_IN_FLIGHT)

        async def check(content: str) -> str:
            async with in_flight:
                return await self.check_text(
                    content, request_id=request_id, tenant=tenant, model=model,
                    timeout_s=max(deadline - loop.time(), _MIN_TIMEOUT_S))

        checks = [asyncio.ensure_future(check(c)) for c in contents]
        try:
            checked = dict(zip(contents, await asyncio.gather(*checks), strict=True))
        finally:
            for task in checks:  # a message refused, or the caller gone: the rest stop
                task.cancel()
        out = list(messages)
        for i in range(first, len(messages)):
            if out[i].role not in CHECKED_ROLES:
                continue
            text = checked.get(out[i].content, out[i].content)
            if text != out[i].content:
                out[i] = dataclasses.replace(out[i], content=text)
        return tuple(out)

    def moderation(self, *, request_id: str, tenant: str) -> OutputModeration:
        return OutputModeration(self, request_id=request_id, tenant=tenant)


@dataclass(frozen=True, slots=True)
class _Sent:
    """A piece written to the Moderate stream (or passed on unmoderated, fail-open)."""

    text: str
    sent_ns: int  # time.time_ns() when it was written
    error: BaseException | None = None  # the write failed: its verdict will not come


class _StreamEnded:
    """Queued when the Moderate stream ends, however it ends: the reader, waiting for the
    next piece, learns at once of a safety service that died between pieces."""


_Queued = _Sent | BaseException | _StreamEnded | None  # None: every piece was sent


@dataclass(slots=True)
class _Outbox:
    """The sending side of one stream (every mode but lockstep): how many messages await
    their verdicts, and what is held back until one comes back (ADAPTIVE).

    Every write and every put on ``queue`` happens under ``lock``, so the queue's order is
    the stream's. Text is held only while ``max_in_flight`` messages are in flight, so a
    verdict to come sends it."""

    queue: asyncio.Queue[_Queued]  # to the reader: each message sent, then the end
    max_in_flight: int  # sys.maxsize: every piece goes at once (PIPELINED, WINDOW)
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    num_in_flight: int = 0  # messages being written or awaiting their verdicts
    held_text: str = ""  # pieces generated while max_in_flight were in flight, in order
    is_final_held: bool = False  # the final piece is among them: they go with flush
    is_ended: bool = False  # the pieces ended while some were held
    end: BaseException | None = None  # then: how they ended (queued after the held)

    @property
    def is_holding(self) -> bool:
        return bool(self.held_text) or self.is_final_held


class OutputModeration:
    """One generation's Moderate stream, opened on the first text."""

    def __init__(self, gate: SafetyGate | None, *, request_id: str = "", tenant: str = ""
                 ) -> None:
        self.gate = gate  # None: no moderation (every text passes)
        self.request_id = request_id
        self.tenant = tenant
        self.call: grpc.aio.StreamStreamCall | None = None
        self.is_bypassed = gate is None  # fail-open after an error: pass text unmoderated

    async def moderate(self, pieces: AsyncGenerator[Piece, None], *,
                       on_verdict: Callable[[int, int], None] | None = None
                       ) -> AsyncGenerator[Moderated, None]:
        """What the client may see of ``pieces``, in order. Ends after the final piece's
        verdict, or after a Moderated with ``blocked`` set. ``on_verdict(sent_ns,
        answered_ns)`` hears of each verdict. Errors of ``pieces`` are raised here."""
        if self.gate is None:
            async for piece in pieces:
                yield Moderated.unchanged(piece.text)
            return
        settings = self.gate.settings
        if settings.moderation_mode == ModerationMode.LOCKSTEP:
            async for piece in pieces:
                sent = await self._send(piece)
                if sent is not None:
                    out = await self._verdict(sent, on_verdict)
                    yield out
                    if out.blocked:
                        return
            return
        if settings.moderation_mode == ModerationMode.WINDOW:
            pieces = _windows(pieces, window_s=settings.window_s,
                              window_chars=settings.window_chars)
        outbox = _Outbox(asyncio.Queue(), max_in_flight=(
            settings.max_in_flight if settings.moderation_mode == ModerationMode.ADAPTIVE
            else sys.maxsize))
        writer = asyncio.ensure_future(self._send_all(pieces, outbox))
        try:
            while (item := await outbox.queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _StreamEnded):
                    await self._check_ended()
                    continue
                out = await self._verdict(item, on_verdict)
                if out.blocked:
                    yield out
                    return
                outbox.num_in_flight -= 1
                if outbox.is_holding:  # on its way before the client takes this text
                    await self._send_held(outbox)
                yield out
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _send_all(self, pieces: AsyncGenerator[Piece, None], outbox: _Outbox
                        ) -> None:
        """Sends each piece without waiting for verdicts while fewer than
        ``max_in_flight`` are in flight, else holds it for ``_send_held``; queues what
        was sent, then None (or the error ``pieces`` raised) after anything held."""
        end: BaseException | None = None
        try:
            async for piece in pieces:
                if outbox.is_holding or outbox.num_in_flight >= outbox.max_in_flight:
                    outbox.held_text += piece.text
                    outbox.is_final_held |= piece.is_final
                elif piece.text or piece.is_final:
                    await self._send_queued(piece, outbox)
        except Exception as exc:  # the generation's error, raised to the reader
            end = exc
        finally:
            await pieces.aclose()  # cancelled mid-write: end the generation's side too
        async with outbox.lock:
            if outbox.is_holding:
                outbox.is_ended, outbox.end = True, end
            else:
                outbox.queue.put_nowait(end)

    async def _send_held(self, outbox: _Outbox) -> None:
        """A verdict came back: what was held goes as one message (then the end of the
        pieces, if they ended meanwhile and nothing more is held)."""
        piece = Piece(outbox.held_text, is_final=outbox.is_final_held)
        outbox.held_text, outbox.is_final_held = "", False
        await self._send_queued(piece, outbox)
        async with outbox.lock:
            if outbox.is_ended and not outbox.is_holding:
                outbox.is_ended = False
                outbox.queue.put_nowait(outbox.end)

    async def _send_queued(self, piece: Piece, outbox: _Outbox) -> None:
        outbox.num_in_flight += 1  # counted before the write: pieces hold meanwhile
        async with outbox.lock:
            is_opening = self.call is None and not self.is_bypassed
            sent = await self._send(piece)
            if is_opening and self.call is not None:
                self.call.add_done_callback(lambda _: outbox.queue.put_nowait(_StreamEnded()))
            if sent is None:
                outbox.num_in_flight -= 1
            else:
                outbox.queue.put_nowait(sent)

    async def _send(self, piece: Piece) -> _Sent | None:
        """Writes a piece; None when there is nothing to moderate."""
        if not piece.text and (not piece.is_final or self.call is None):
            return None  # nothing new (or nothing was generated at all)
        now_ns = time.time_ns()
        if self.is_bypassed:
            return _Sent(piece.text, now_ns)
        assert self.gate is not None
        request = safety_pb2.ModerateRequest(text=piece.text, flush=piece.is_final)
        if self.call is None:
            # The opening message names the request and carries the first text with it.
            request.request_id, request.tenant = self.request_id, self.tenant
            self.call = self.gate.stub.Moderate(metadata=trace_metadata())
        try:
            await self.call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            return _Sent(piece.text, now_ns, error=exc)
        return _Sent(piece.text, now_ns)

    async def _verdict(self, sent: _Sent, on_verdict: Callable[[int, int], None] | None
                       ) -> Moderated:
        """The text of ``sent`` the client may see, once the service has answered."""
        if self.is_bypassed:
            return Moderated.unchanged(sent.text)
        assert self.gate is not None and self.call is not None
        try:
            if sent.error is not None:
                raise sent.error
            async with asyncio.timeout(self.gate.settings.timeout_s):
                reply = await self.call.read()
            if reply is grpc.aio.EOF:
                raise EOFError("the safety service closed the moderation stream")
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError,
                EOFError) as exc:
            self.close()
            if self.gate.settings.output_failure_mode == FailureMode.OPEN:
                log.warning("output no longer moderated: the safety service failed "
                            "(fail-open)", extra={"request_id": self.request_id,
                                                  "error": type(exc).__name__})
                self.is_bypassed = True
                return Moderated.unchanged(sent.text)
            raise _unavailable("the output cannot be moderated", exc) from None
        if on_verdict is not None:
            on_verdict(sent.sent_ns, time.time_ns())
        # A service that does not count its input (older than num_input_chars) allows
        # text unchanged.
        num_input_chars = reply.num_input_chars or len(reply.text)
        is_redacted = reply.verdict == safety_pb2.VERDICT_REDACT or any(
            f.action == safety_pb2.VERDICT_REDACT for f in reply.findings)
        if reply.verdict == safety_pb2.VERDICT_BLOCK:
            self.close()
            return Moderated(reply.text, blocked=reply.reason or "content_filter",
                             num_input_chars=num_input_chars, is_redacted=is_redacted)
        return Moderated(reply.text, num_input_chars=num_input_chars, is_redacted=is_redacted)

    async def _check_ended(self) -> None:
        """The Moderate stream has ended: fine if the service closed it after its last
        verdict (those queued are still read); a failure ends the output now, as a
        verdict that cannot come would (fail-open: the rest passes unmoderated)."""
        call = self.call
        if call is None or self.is_bypassed:
            return  # closed here, or moderation already bypassed
        code = await call.code()
        if code == grpc.StatusCode.OK:
            return
        exc = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   details=await call.details())
        self.close()
        assert self.gate is not None
        if self.gate.settings.output_failure_mode == FailureMode.OPEN:
            log.warning("output no longer moderated: the safety service failed (fail-open)",
                        extra={"request_id": self.request_id, "error": code.name})
            self.is_bypassed = True
            return
        raise _unavailable("the output cannot be moderated", exc)

    def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
            self.call = None


async def _windows(pieces: AsyncGenerator[Piece, None], *, window_s: float,
                   window_chars: int) -> AsyncGenerator[Piece, None]:
    """``pieces`` gathered: a piece waits at most ``window_s`` for others to join it, and
    goes as soon as the gathered text has ``window_chars`` characters or is final."""
    queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for piece in pieces:
                queue.put_nowait(piece)
            queue.put_nowait(None)
        except Exception as exc:
            queue.put_nowait(exc)
        finally:
            await pieces.aclose()

    pumping = asyncio.ensure_future(pump())
    loop = asyncio.get_running_loop()
    text, deadline = "", None
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    item = await queue.get()
            except TimeoutError:
                yield Piece(text)
                text, deadline = "", None
                continue
            if item is None:
                if text:
                    yield Piece(text)
                return
            if isinstance(item, BaseException):
                raise item
            text += item.text
            if item.is_final or len(text) >= window_chars:
                yield Piece(text, is_final=item.is_final)
                if item.is_final:
                    return
                text, deadline = "", None
            elif text and deadline is None:
                deadline = loop.time() + window_s
    finally:
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumping
