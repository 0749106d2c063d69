"""One bidirectional Chat session: a state machine over the client's messages, turns
run as tasks through the pipeline, and one outbound queue of events.

Each turn sends the whole conversation (system prompt, completed turns, the new user
message), so the worker's prefix cache serves the history. Only completed turns enter
the history: a cancelled or failed turn is dropped, as if it had not been sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from opentelemetry.context import Context

from genmesh.core.models.chat_template import ChatMessage
from genmesh.v1 import common_pb2, generation_pb2
from services.common.telemetry import tracer as get_tracer
from services.frontend.catalog import ModelCatalog
from services.frontend.errors import PipelineError
from services.frontend.events import Finished, Started, TextChunk
from services.frontend.fields import check_name
from services.frontend.pipeline import Pipeline, PipelineRequest


class SessionError(PipelineError):
    """An error of the session itself: it ends the stream with this status."""


@dataclass(frozen=True, slots=True)
class SessionSettings:
    model: str
    model_version: str
    system_prompt: str
    params: common_pb2.SamplingParams
    tenant: str


_END = object()  # queued after the last event of the session
# Events queued for a client that has not read them yet, past which the session stops
# reading the client's messages until it reads: a client that floods messages (each
# answered by an event) and never reads stalls itself, by HTTP/2 flow control, and holds
# no more of the frontend's memory. A turn's own deltas are not held back (its max_tokens
# bounds them).
MAX_QUEUED_EVENTS = 256
# Client messages refused in a row (empty, out of order, ...) that end the session: each
# costs an event, and a client sending nothing else is not holding a conversation.
MAX_REFUSED_IN_A_ROW = 64
tracer = get_tracer(__name__)


class ChatSession:
    def __init__(self, *, pipeline: Pipeline, catalog: ModelCatalog, timeout_s: float,
                 max_turns: int, tenant: str = "", trace_context: Context | None = None
                 ) -> None:
        self.pipeline = pipeline
        # The caller's trace (Envoy's span of the stream): each turn is a span under it,
        # never one span for a session that may last an hour.
        self.trace_context = trace_context
        self.tenant = tenant  # from the gateway, for the whole session
        self.catalog = catalog
        self.timeout_s = timeout_s
        self.max_turns = max_turns
        self.settings: SessionSettings | None = None
        self.history: list[ChatMessage] = []
        self.num_turns = 0
        self.turn_task: asyncio.Task | None = None
        # The last turn that has sent its TurnFinished (or error): the client may start the
        # next turn while that one still releases what it held.
        self.last_finished_turn = 0
        self.out: asyncio.Queue = asyncio.Queue()
        self.has_room = asyncio.Event()  # set while out holds < MAX_QUEUED_EVENTS
        self.has_room.set()
        self.num_refused_in_a_row = 0  # client messages answered by an error, in a row

    async def run(self, requests: AsyncIterator[generation_pb2.ChatRequest]
                  ) -> AsyncGenerator[generation_pb2.ChatEvent, None]:
        """Events for the client until the session ends; raises SessionError."""
        reader = asyncio.create_task(self._read(requests))
        try:
            while True:
                item = await self.out.get()
                if self.out.qsize() < MAX_QUEUED_EVENTS:
                    self.has_room.set()
                if item is _END:
                    return
                if isinstance(item, Exception):  # a SessionError, or the call's abort
                    raise item
                yield item
        finally:
            reader.cancel()
            if self.turn_task is not None:
                self.turn_task.cancel()
            await asyncio.gather(reader, *([self.turn_task] if self.turn_task else []),
                                 return_exceptions=True)

    async def _read(self, requests: AsyncIterator[generation_pb2.ChatRequest]) -> None:
        try:
            async for msg in requests:
                if self.out.qsize() >= MAX_QUEUED_EVENTS:
                    self.has_room.clear()
                    await self.has_room.wait()
                num_refused = self.num_refused_in_a_row
                if not self._handle(msg):
                    # EndSession: the running turn is cancelled (and reported) first.
                    await self._stop_turn()
                    break
                if self.num_refused_in_a_row == num_refused:  # this one was taken
                    self.num_refused_in_a_row = 0
            else:
                # The client half-closed: let the running turn finish, then end.
                if self.turn_task is not None:
                    await asyncio.wait([self.turn_task])
            self.out.put_nowait(_END)
        except SessionError as exc:
            await self._stop_turn()
            self.out.put_nowait(exc)
        except Exception as exc:  # reading failed (an undecodable message aborted the call)
            self.out.put_nowait(exc)

    def _handle(self, msg: generation_pb2.ChatRequest) -> bool:
        """Acts on one client message; False when the session should end."""
        action = msg.WhichOneof("action")
        if self.settings is None:
            if action != "start":
                raise SessionError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"the first Chat message must be start (StartSession), "
                                   f"got {action or 'an empty message'}")
            self._start(msg.start)
        elif action == "turn":
            self._begin_turn(msg.turn)
        elif action == "cancel":
            if self._is_turn_running():
                assert self.turn_task is not None
                self.turn_task.cancel()
            else:
                self._refuse(grpc.StatusCode.FAILED_PRECONDITION, "no turn is running to cancel")
        elif action == "end":
            return False
        elif action == "start":
            self._refuse(grpc.StatusCode.FAILED_PRECONDITION, "the session is already started")
        else:
            self._refuse(grpc.StatusCode.INVALID_ARGUMENT,
                         "empty ChatRequest: set one of start, turn, cancel or end")
        return True

    def _start(self, start: generation_pb2.StartSession) -> None:
        try:
            check_name("start.model", start.model)
            check_name("start.model_version", start.model_version)
            model, version = self.catalog.resolve(start.model, start.model_version)
        except PipelineError as exc:
            raise SessionError(exc.code, exc.message) from None
        self.settings = SessionSettings(model=model, model_version=version,
                                        system_prompt=start.system_prompt,
                                        params=start.params, tenant=self.tenant)

    def _begin_turn(self, turn: generation_pb2.UserTurn) -> None:
        if self._is_turn_running():
            self._refuse(grpc.StatusCode.FAILED_PRECONDITION,
                         "a turn is already running: wait for turn_finished or send cancel")
            return
        if not turn.content.strip():
            self._refuse(grpc.StatusCode.INVALID_ARGUMENT, "turn.content must not be empty")
            return
        if self.num_turns >= self.max_turns:
            self._refuse(grpc.StatusCode.FAILED_PRECONDITION,
                         f"the session has run {self.max_turns} turns; start a new session")
            return
        assert self.settings is not None
        self.num_turns += 1
        request_id = uuid.uuid4().hex
        self.out.put_nowait(generation_pb2.ChatEvent(turn_started=generation_pb2.TurnStarted(
            turn=self.num_turns, request_id=request_id)))
        system = ([ChatMessage("system", self.settings.system_prompt)]
                  if self.settings.system_prompt else [])
        user = ChatMessage("user", turn.content)
        req = PipelineRequest(
            request_id=request_id, model=self.settings.model,
            model_version=self.settings.model_version, prompt=None,
            messages=(*system, *self.history, user),
            params=turn.params if turn.HasField("params") else self.settings.params,
            priority=common_pb2.PRIORITY_INTERACTIVE, tenant=self.settings.tenant, method="Chat",
            # The system prompt and the history passed the check in an earlier turn.
            num_checked_messages=len(system) + len(self.history) if self.history else 0)
        previous = self.turn_task
        self.turn_task = asyncio.create_task(self._run_turn(self.num_turns, req, user,
                                                            previous=previous))

    async def _run_turn(self, n: int, req: PipelineRequest, user: ChatMessage, *,
                        previous: asyncio.Task | None = None) -> None:
        if previous is not None and not previous.done():
            # The last turn has finished but may still be releasing its worker request
            # and budget; a second or so at most.
            await asyncio.wait([previous], timeout=5.0)
        try:
            with tracer.start_as_current_span(
                    "genmesh.v1.Generation/Chat turn", context=self.trace_context,
                    kind=trace.SpanKind.SERVER, attributes={"genmesh.turn": n}):
                await self._stream_turn(n, req, user)
        except asyncio.CancelledError:
            # Cancelled by the client (or the session closing): closing the pipeline's
            # stream above has already aborted the worker request.
            if self.last_finished_turn != n:
                self.last_finished_turn = n
                self.out.put_nowait(generation_pb2.ChatEvent(
                    turn_finished=generation_pb2.TurnFinished(
                        turn=n, finish_reason=common_pb2.FINISH_REASON_ABORT)))
        except PipelineError as exc:
            self.last_finished_turn = n
            self._error(exc.code, exc.message, turn=n)

    async def _stream_turn(self, n: int, req: PipelineRequest, user: ChatMessage) -> None:
        parts: list[str] = []
        seen = user  # the user's message as the model saw it (redacted by the policy)
        async with contextlib.aclosing(self.pipeline.run(req, timeout_s=self.timeout_s)
                                       ) as events:
            async for event in events:
                if isinstance(event, Started) and event.messages:
                    seen = event.messages[-1]
                elif isinstance(event, TextChunk):
                    parts.append(event.text)
                    self.out.put_nowait(generation_pb2.ChatEvent(
                        delta=generation_pb2.TextDelta(
                            turn=n, text=event.text,
                            logprobs=[c.logprob for c in event.logprobs])))
                elif isinstance(event, Finished):
                    self.history += [seen, ChatMessage("assistant", "".join(parts))]
                    self.last_finished_turn = n
                    self.out.put_nowait(generation_pb2.ChatEvent(
                        turn_finished=generation_pb2.TurnFinished(
                            turn=n, finish_reason=event.finish_reason, usage=event.usage,
                            finish_detail=event.detail)))

    def _is_turn_running(self) -> bool:
        return (self.turn_task is not None and not self.turn_task.done()
                and self.last_finished_turn != self.num_turns)

    async def _stop_turn(self) -> None:
        if self._is_turn_running():
            assert self.turn_task is not None
            self.turn_task.cancel()
            await asyncio.wait([self.turn_task])

    def _refuse(self, code: grpc.StatusCode, message: str) -> None:
        """Answer a client message with an error event; end the session at the
        MAX_REFUSED_IN_A_ROW-th in a row."""
        self.num_refused_in_a_row += 1
        if self.num_refused_in_a_row >= MAX_REFUSED_IN_A_ROW:
            raise SessionError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{self.num_refused_in_a_row} messages in a row were refused "
                               f"(the last: {message}); the session is ended")
        self._error(code, message)

    def _error(self, code: grpc.StatusCode, message: str, *, turn: int = 0) -> None:
        self.out.put_nowait(generation_pb2.ChatEvent(error=generation_pb2.ChatError(
            code=code.value[0], message=message, turn=turn)))
