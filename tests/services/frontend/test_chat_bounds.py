"""A Chat session holds a bounded share of the frontend: a client that floods messages and
never reads stalls itself alone, and one that sends only refused messages is ended."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from genmesh.v1 import generation_pb2
from services.frontend import chat
from services.frontend.chat import ChatSession, SessionError


class Catalog:
    def resolve(self, model: str, version: str) -> tuple[str, str]:
        return model or "m", version


def session() -> ChatSession:
    return ChatSession(pipeline=None, catalog=Catalog(), timeout_s=5.0,  # type: ignore[arg-type]
                       max_turns=4)


async def flood(num_messages: int, read: list[int]) -> AsyncIterator[generation_pb2.ChatRequest]:
    """start, then ``num_messages`` empty messages; ``read`` counts those taken."""
    yield generation_pb2.ChatRequest(start=generation_pb2.StartSession())
    for _ in range(num_messages):
        read[0] += 1
        yield generation_pb2.ChatRequest()


def test_a_session_of_refused_messages_is_ended_at_the_limit():
    async def run() -> tuple[list[generation_pb2.ChatEvent], SessionError]:
        events: list[generation_pb2.ChatEvent] = []
        with pytest.raises(SessionError) as ended:
            async for event in session().run(flood(1000, [0])):
                events.append(event)
        return events, ended.value

    events, ended = asyncio.run(run())
    assert len(events) == chat.MAX_REFUSED_IN_A_ROW - 1 == 63
    assert {e.error.message for e in events} == {
        "empty ChatRequest: set one of start, turn, cancel or end"}
    assert ended.code == grpc.StatusCode.INVALID_ARGUMENT
    assert ended.message == (
        "64 messages in a row were refused (the last: empty ChatRequest: set one of start, "
        "turn, cancel or end); the session is ended")


def test_an_accepted_message_resets_the_count():
    s = session()
    s._handle(generation_pb2.ChatRequest(start=generation_pb2.StartSession()))
    for _ in range(chat.MAX_REFUSED_IN_A_ROW - 1):
        s._handle(generation_pb2.ChatRequest())
    assert s.num_refused_in_a_row == 63
    s.num_refused_in_a_row = 0  # what _read does after a message that was taken
    s._handle(generation_pb2.ChatRequest())
    assert s.num_refused_in_a_row == 1


def test_a_client_that_does_not_read_stops_being_read(monkeypatch):
    monkeypatch.setattr(chat, "MAX_REFUSED_IN_A_ROW", 10_000)

    async def run() -> tuple[int, int, int]:
        read = [0]
        events = session().run(flood(5000, read))
        first = await events.__anext__()  # the reader runs; the client reads no more
        assert first.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        await asyncio.sleep(0.2)
        stalled_at = read[0]
        num_more = 0
        async for _ in events:  # reading again lets it go on, to the end
            num_more += 1
        return stalled_at, num_more, read[0]

    stalled_at, num_more, num_read = asyncio.run(run())
    # Each message became one queued event: reading stopped with the queue full.
    assert stalled_at == chat.MAX_QUEUED_EVENTS + 2 == 258
    assert (num_more, num_read) == (4999, 5000)
