"""Output moderation with a fake Moderate stream whose verdicts the test releases: text
reaches the client only with its verdict, in order; a block ends the output. Adaptive
mode (the default) sends a piece at once when no verdict is outstanding and gathers what
comes meanwhile into one message; pipelined, lockstep and window modes; failures per
failure mode."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import grpc
import pytest

from genmesh.core.failure import FailureMode
from genmesh.v1 import safety_pb2
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
        self.status: tuple[grpc.StatusCode, str] | None = None  # set once it ended
        self.on_done: list = []

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

    def add_done_callback(self, callback) -> None:
        self.on_done.append(callback)

    def fail(self, code: grpc.StatusCode, details: str) -> None:
        """The service died: the stream ends with ``code`` (nothing more is read)."""
        self.status = (code, details)
        for callback in self.on_done:
            callback(self)

    async def code(self) -> grpc.StatusCode:
        assert self.status is not None
        return self.status[0]

    async def details(self) -> str:
        assert self.status is not None
        return self.status[1]


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
        self.is_closed = False  # the generator was closed (ended or left)

    def emit(self, text: str, *, final: bool = False) -> None:
        self.queue.put_nowait(Piece(text, is_final=final))

    async def pieces(self) -> AsyncGenerator[Piece, None]:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.is_final:
                    return
        finally:
            self.is_closed = True


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


def written(call: FakeCall) -> list[tuple[str, bool]]:
    return [(m.text, m.flush) for m in call.written]


def moderation(stub: FakeStub, **settings: object) -> OutputModeration:
    gate = SafetyGate(stub, SafetySettings(**settings))  # type: ignore[arg-type]
    return gate.moderation(request_id="r1", tenant="acme")


def test_text_is_sent_at_once_and_released_only_with_its_verdict_in_order():
    async def run() -> None:
        stub, gen = FakeStub(), Generation()
        client = Client(moderation(stub, moderation_mode=ModerationMode.PIPELINED), gen)
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
        client = Client(moderation(stub, moderation_mode=ModerationMode.PIPELINED), gen)
        gen.emit("one ")
        gen.emit(f"two {BLOCKED} three")
        gen.emit(" four")  # sent ahead of the block's verdict: never released
        await settle()
        call = stub.calls[0]
        assert len(call.written) == 3
        call.release(3)
        await asyncio.wait_for(client.task, 1)
        assert client.seen == [Moderated.unchanged("one "),
                               Moderated("two ", "violence", num_input_chars=4)]
        assert call.is_cancelled

    asyncio.run(run())


@pytest.mark.parametrize("mode", list(ModerationMode))
def test_an_empty_generation_opens_no_stream(mode):
    async def run() -> None:
        stub, gen = FakeStub(), Generation()
        client = Client(moderation(stub, moderation_mode=mode), gen)
        gen.emit("")
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


@pytest.mark.parametrize("mode", [ModerationMode.ADAPTIVE, ModerationMode.PIPELINED])
def test_the_generation_s_error_comes_after_the_verdicts_of_what_came_before(mode):
    async def run() -> None:
        stub, gen = FakeStub(), Generation()
        client = Client(moderation(stub, moderation_mode=mode), gen)
        gen.emit("a")
        gen.queue.put_nowait(PipelineError(grpc.StatusCode.INTERNAL, "generation failed"))
        await settle()
        assert client.seen == [] and not client.task.done()
        stub.calls[0].release()
        with pytest.raises(PipelineError, match="generation failed"):
            await asyncio.wait_for(client.task, 1)
        assert client.texts == ["a"]

    asyncio.run(run())


@pytest.mark.parametrize("moderation_mode", [ModerationMode.ADAPTIVE,
                                             ModerationMode.PIPELINED])
@pytest.mark.parametrize("mode", [FailureMode.CLOSED, FailureMode.OPEN])
def test_a_verdict_that_does_not_come_in_time(mode, moderation_mode):
    async def run() -> None:
        stub, gen = FakeStub(), Generation()
        client = Client(moderation(stub, timeout_s=0.05, output_failure_mode=mode,
                                   moderation_mode=moderation_mode), gen)
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


@pytest.mark.parametrize("mode", [FailureMode.CLOSED, FailureMode.OPEN])
def test_a_stream_that_dies_between_pieces_ends_the_output_at_once(mode):
    """The safety service dies while no verdict is outstanding: the output fails now, not
    at its next piece (which may be seconds away on a busy worker)."""
    async def run() -> None:
        stub, gen = FakeStub(), Generation()
        client = Client(moderation(stub, output_failure_mode=mode), gen)
        gen.emit("a")
        await settle()
        stub.calls[0].release()
        await settle()
        assert client.texts == ["a"]
        stub.calls[0].fail(grpc.StatusCode.UNAVAILABLE, "Socket closed")
        if mode == FailureMode.CLOSED:
            with pytest.raises(PipelineError) as err:
                await asyncio.wait_for(client.task, 1)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert "(Socket closed)" in err.value.message
            assert stub.calls[0].is_cancelled
        else:  # what follows passes unmoderated
            await settle()
            gen.emit("b", final=True)
            await asyncio.wait_for(client.task, 1)
            assert client.texts == ["a", "b"]

    asyncio.run(run())


def test_a_stream_closed_after_its_last_verdict_is_a_normal_end():
    async def run() -> None:
        stub, gen = FakeStub(), Generation()
        client = Client(moderation(stub), gen)
        gen.emit("a")
        gen.emit("b", final=True)
        await settle()
        stub.calls[0].release(2)
        stub.calls[0].fail(grpc.StatusCode.OK, "")
        await asyncio.wait_for(client.task, 1)
        assert "".join(client.texts) == "ab"

    asyncio.run(run())


def test_adaptive_sends_at_once_and_gathers_what_comes_while_a_verdict_is_outstanding():
    async def run() -> None:
        stub, gen = FakeStub(), Generation()
        client = Client(moderation(stub), gen)  # adaptive, one message in flight
        gen.emit("")  # nothing new: nothing sent, nothing opened
        await settle()
        assert stub.calls == []
        gen.emit("Hel")  # no verdict outstanding: sent at once
        await settle()
        call = stub.calls[0]
        assert [(m.request_id, m.tenant) for m in call.written] == [("r1", "acme")]
        assert written(call) == [("Hel", False)]
        gen.emit("lo")
        gen.emit(" wor")
        await settle()
        assert written(call) == [("Hel", False)]  # held: "Hel" awaits its verdict
        assert client.seen == []
        call.release()  # "Hel"'s verdict: what was held goes as one message
        await settle()
        assert client.texts == ["Hel"]
        assert written(call) == [("Hel", False), ("lo wor", False)]
        assert call.written[1].request_id == ""  # only the opening message names it
        call.release()
        await settle()
        assert client.texts == ["Hel", "lo wor"]
        gen.emit("ld")  # no verdict outstanding again: at once
        await settle()
        assert written(call) == [("Hel", False), ("lo wor", False), ("ld", False)]
        gen.emit("!")
        gen.emit("", final=True)  # held with "!": both go, flushed, with the verdict
        await settle()
        assert len(call.written) == 3
        call.release()
        await settle()
        assert written(call) == [("Hel", False), ("lo wor", False), ("ld", False),
                                 ("!", True)]
        call.release()
        await asyncio.wait_for(client.task, 1)
        assert client.texts == ["Hel", "lo wor", "ld", "!"]
        assert all(not m.blocked for m in client.seen)
        assert gen.is_closed

    asyncio.run(run())


def test_adaptive_sends_a_final_piece_that_finds_no_verdict_outstanding_at_once():
    async def run() -> None:
        stub, gen = FakeStub(), Generation()
        client = Client(moderation(stub), gen)
        gen.emit("a")
        await settle()
        call = stub.calls[0]
        call.release()
        await settle()
        gen.emit("b", final=True)
        await settle()
        assert written(call) == [("a", False), ("b", True)]
        call.release()
        await asyncio.wait_for(client.task, 1)
        assert client.texts == ["a", "b"]

    asyncio.run(run())


def test_adaptive_with_two_in_flight_holds_only_the_third():
    async def run() -> None:
        stub, gen = FakeStub(), Generation()
        client = Client(moderation(stub, max_in_flight=2), gen)
        for text in ("a", "b", "c", "d"):
            gen.emit(text)
        gen.emit("e", final=True)
        await settle()
        call = stub.calls[0]
        assert written(call) == [("a", False), ("b", False)]
        call.release()  # "a": one in flight, "cde" joins it
        await settle()
        assert client.texts == ["a"]
        assert written(call) == [("a", False), ("b", False), ("cde", True)]
        call.release(2)
        await asyncio.wait_for(client.task, 1)
        assert client.texts == ["a", "b", "cde"]

    asyncio.run(run())


def test_adaptive_block_mid_stream_sends_and_releases_nothing_after_it():
    async def run() -> None:
        stub, gen = FakeStub(), Generation()
        client = Client(moderation(stub), gen)
        gen.emit("one ")
        await settle()
        call = stub.calls[0]
        gen.emit(f"two {BLOCKED}")
        gen.emit(" three")
        await settle()
        call.release()
        await settle()
        assert written(call) == [("one ", False), (f"two {BLOCKED} three", False)]
        gen.emit(" four")  # held behind the block's verdict: never sent
        gen.emit(" five", final=True)
        await settle()
        call.release()
        await asyncio.wait_for(client.task, 1)
        assert client.seen == [Moderated.unchanged("one "),
                               Moderated("two ", "violence", num_input_chars=4)]
        assert len(call.written) == 2
        assert call.is_cancelled and gen.is_closed

    asyncio.run(run())


def test_adaptive_text_held_when_the_generation_fails_is_moderated_before_the_error():
    async def run() -> None:
        stub, gen = FakeStub(), Generation()
        client = Client(moderation(stub), gen)
        gen.emit("a")
        gen.emit("b")
        gen.queue.put_nowait(PipelineError(grpc.StatusCode.INTERNAL, "generation failed"))
        await settle()
        call = stub.calls[0]
        assert written(call) == [("a", False)]
        call.release()
        await settle()
        assert written(call) == [("a", False), ("b", False)]
        assert client.texts == ["a"] and not client.task.done()
        call.release()
        with pytest.raises(PipelineError, match="generation failed"):
            await asyncio.wait_for(client.task, 1)
        assert client.texts == ["a", "b"]

    asyncio.run(run())


@pytest.mark.parametrize("mode", [FailureMode.CLOSED, FailureMode.OPEN])
def test_adaptive_held_text_when_the_verdict_does_not_come_in_time(mode):
    async def run() -> None:
        stub, gen = FakeStub(), Generation()
        client = Client(moderation(stub, timeout_s=0.05, output_failure_mode=mode), gen)
        gen.emit("a")
        gen.emit("b")
        gen.emit("c", final=True)
        if mode == FailureMode.CLOSED:  # refused; what was held is never sent
            with pytest.raises(PipelineError) as err:
                await asyncio.wait_for(client.task, 1)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert client.seen == []
        else:  # the held text is passed on unmoderated, logged
            await asyncio.wait_for(client.task, 1)
            assert client.texts == ["a", "bc"]
        assert written(stub.calls[0]) == [("a", False)]
        assert stub.calls[0].is_cancelled

    asyncio.run(run())


@pytest.mark.parametrize("mode", [ModerationMode.ADAPTIVE, ModerationMode.PIPELINED])
def test_cancelling_the_consumer_ends_the_writer_and_the_generation(mode):
    async def run() -> None:
        stub, gen = FakeStub(), Generation()
        client = Client(moderation(stub, moderation_mode=mode), gen)
        gen.emit("a")
        gen.emit("b")
        await settle()
        client.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await client.task
        await settle()
        assert gen.is_closed and client.seen == []
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

    asyncio.run(run())


def test_max_in_flight_below_one_is_refused():
    with pytest.raises(ValueError, match="max_in_flight"):
        SafetySettings(max_in_flight=0)
