"""Output moderation with a fake Moderate stream whose verdicts the test releases: text is
sent as it is generated, and reaches the client only with its verdict, in order; a block
ends the output; lockstep and window modes; failures per failure mode."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import grpc
import pytest

from genmesh.v1 import safety_pb2
from services.common.failure import FailureMode
from services.frontend.errors import PipelineError
from services.frontend.moderation import (
    Moderated,
    ModerationMode,
    OutputModeration,
    Piece,
    SafetyGate,
    SafetySettings,
)

BLOCKED = "BAD"


class FakeCall:
    """A Moderate stream: each written message is answered, once the test releases the
    answer, like the safety service: its text back, or BLOCK from ``BLOCKED`` on."""

    def __init__(self) -> None:
        self.written: list[safety_pb2.ModerateRequest] = []
        self.released = asyncio.Semaphore(0)  # answers the test has let through
        self.num_read = 0
        self.is_cancelled = False

    async def write(self, request: safety_pb2.ModerateRequest) -> None:
        self.written.append(request)

    async def read(self) -> safety_pb2.ModerateResponse:
        await self.released.acquire()
        text = self.written[self.num_read].text
        self.num_read += 1
        if BLOCKED in text:
            return safety_pb2.ModerateResponse(text=text[:text.index(BLOCKED)],
                                               verdict=safety_pb2.VERDICT_BLOCK,
                                               reason="violence")
        return safety_pb2.ModerateResponse(text=text, verdict=safety_pb2.VERDICT_ALLOW)

    def release(self, num: int = 1) -> None:
        for _ in range(num):
            self.released.release()

    def cancel(self) -> None:
        self.is_cancelled = True


class FakeStub:
    def __init__(self) -> None:
        self.calls: list[FakeCall] = []

    def Moderate(self, **kwargs: object) -> FakeCall:
        self.calls.append(FakeCall())
        return self.calls[-1]


class Generation:
    """Pieces the test hands out one by one, as a worker would generate them."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Piece | Exception] = asyncio.Queue()

    def emit(self, text: str, *, final: bool = False) -> None:
        self.queue.put_nowait(Piece(text, is_final=final))

    async def pieces(self) -> AsyncGenerator[Piece, None]:
        while True:
            item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            yield item
            if item.is_final:
                return


class Client:
    """Collects what moderation releases, on its own task."""

    def __init__(self, moderation: OutputModeration, generation: Generation) -> None:
        self.seen: list[Moderated] = []
        self.task = asyncio.ensure_future(self._collect(moderation, generation))

    async def _collect(self, moderation: OutputModeration, generation: Generation) -> None:
        async for out in moderation.moderate(generation.pieces()):
            self.seen.append(out)

    @property
    def texts(self) -> list[str]:
        return [m.text for m in self.seen]


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def moderation(stub: FakeStub, **settings: object) -> OutputModeration:
    gate = SafetyGate(stub, SafetySettings(**settings))  # type: ignore[arg-type]
    return gate.moderation(request_id="r1", tenant="acme")


def test_text_is_sent_at_once_and_released_only_with_its_verdict_in_order():
    async def run() -> None:
        stub, gen = FakeStub(), Generation()
        client = Client(moderation(stub), gen)
        gen.emit("")  # nothing new: nothing sent, nothing opened
        await settle()
        assert stub.calls == []
        gen.emit("Hello")
        gen.emit(" wor")
        gen.emit("ld", final=True)
        await settle()
        call = stub.calls[0]
        assert [(m.request_id, m.tenant, m.text, m.flush) for m in call.written] == [
            ("r1", "acme", "Hello", False), ("", "", " wor", False), ("", "", "ld", True)]
        assert client.seen == []  # sent, but no verdict yet
        call.release()
        await settle()
        assert client.texts == ["Hello"]
        call.release(2)
        await asyncio.wait_for(client.task, 1)
        assert client.texts == ["Hello", " wor", "ld"]
        assert all(not m.blocked for m in client.seen)

    asyncio.run(run())


def test_a_block_mid_stream_releases_nothing_after_it():
    async def run() -> None:
        stub, gen = FakeStub(), Generation()
        client = Client(moderation(stub), gen)
        gen.emit("one ")
        gen.emit(f"two {BLOCKED} three")
        gen.emit(" four")  # sent ahead of the block's verdict: never released
        await settle()
        call = stub.calls[0]
        assert len(call.written) == 3
        call.release(3)
        await asyncio.wait_for(client.task, 1)
        assert client.seen == [Moderated("one "), Moderated("two ", blocked="violence")]
        assert call.is_cancelled

    asyncio.run(run())


def test_an_empty_generation_opens_no_stream():
    async def run() -> None:
        stub, gen = FakeStub(), Generation()
        client = Client(moderation(stub), gen)
        gen.emit("", final=True)
        await asyncio.wait_for(client.task, 1)
        assert stub.calls == [] and client.seen == []

    asyncio.run(run())


def test_lockstep_waits_for_each_verdict_before_sending_more():
    async def run() -> None:
        stub, gen = FakeStub(), Generation()
        client = Client(moderation(stub, moderation_mode=ModerationMode.LOCKSTEP), gen)
        gen.emit("a")
        gen.emit("b", final=True)
        await settle()
        call = stub.calls[0]
        assert [m.text for m in call.written] == ["a"]
        call.release()
        await settle()
        assert [m.text for m in call.written] == ["a", "b"] and client.texts == ["a"]
        call.release()
        await asyncio.wait_for(client.task, 1)
        assert client.texts == ["a", "b"]

    asyncio.run(run())


def test_a_window_gathers_pieces_by_size_and_by_time():
    async def run() -> None:
        stub, gen = FakeStub(), Generation()
        client = Client(moderation(stub, moderation_mode=ModerationMode.WINDOW,
                                   window_s=0.05, window_chars=6), gen)
        gen.emit("ab")
        gen.emit("cd")
        await settle()
        assert stub.calls == []  # 4 characters: waiting for more
        gen.emit("efg")  # 7 >= 6: sent at once
        await settle()
        call = stub.calls[0]
        assert [m.text for m in call.written] == ["abcdefg"]
        gen.emit("h")
        await settle()
        assert len(call.written) == 1
        await asyncio.sleep(0.1)  # the window ran out: "h" goes alone
        assert [m.text for m in call.written] == ["abcdefg", "h"]
        gen.emit("i")
        gen.emit("j", final=True)  # the final piece goes at once, with what waits
        await settle()
        assert [(m.text, m.flush) for m in call.written] == [
            ("abcdefg", False), ("h", False), ("ij", True)]
        call.release(3)
        await asyncio.wait_for(client.task, 1)
        assert client.texts == ["abcdefg", "h", "ij"]

    asyncio.run(run())


def test_the_generation_s_error_comes_after_the_verdicts_of_what_came_before():
    async def run() -> None:
        stub, gen = FakeStub(), Generation()
        client = Client(moderation(stub), gen)
        gen.emit("a")
        gen.queue.put_nowait(PipelineError(grpc.StatusCode.INTERNAL, "generation failed"))
        await settle()
        assert client.seen == [] and not client.task.done()
        stub.calls[0].release()
        with pytest.raises(PipelineError, match="generation failed"):
            await asyncio.wait_for(client.task, 1)
        assert client.texts == ["a"]

    asyncio.run(run())


@pytest.mark.parametrize("mode", [FailureMode.CLOSED, FailureMode.OPEN])
def test_a_verdict_that_does_not_come_in_time(mode):
    async def run() -> None:
        stub, gen = FakeStub(), Generation()
        client = Client(moderation(stub, timeout_s=0.05, output_failure_mode=mode), gen)
        gen.emit("a")
        gen.emit("b", final=True)
        if mode == FailureMode.CLOSED:
            with pytest.raises(PipelineError) as err:
                await asyncio.wait_for(client.task, 1)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert client.seen == []
        else:  # passed on unmoderated, logged
            await asyncio.wait_for(client.task, 1)
            assert client.texts == ["a", "b"]
        assert stub.calls[0].is_cancelled

    asyncio.run(run())
