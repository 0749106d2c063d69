"""The worker's stream interval: which steps' tokens go out as one reply."""

from __future__ import annotations

import asyncio
import types

import pytest

from services.worker.engine.outputs import Delta, FinishReason
from services.worker.stream_interval import ReplyGate, StreamInterval


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def step(*tokens: int, finished: bool = False) -> Delta:
    return Delta("r", list(tokens), finish_reason=FinishReason.STOP if finished else None)


def tokens(out: list[Delta] | None) -> list[int] | None:
    return None if out is None else [t for d in out for t in d.new_token_ids]


def gate(running: int = 32, clock: Clock | None = None, **policy: float) -> ReplyGate:
    return ReplyGate(StreamInterval(**policy), lambda: running,  # type: ignore[arg-type]
                     clock or Clock())


def test_the_interval_follows_the_load() -> None:
    p = StreamInterval(max_interval=16, replies_per_step=4, min_batch=8)
    assert [p.interval(n) for n in (0, 1, 7, 8, 9, 16, 17, 32, 64, 65, 500)] == [
        1, 1, 1, 2, 3, 4, 5, 8, 16, 16, 16]


def test_under_load_first_reply_alone_then_interval_tokens_per_reply() -> None:
    g = gate(running=12, replies_per_step=4)  # 3 tokens a reply
    assert tokens(g.add([step(1)])) == [1]  # time to first token never waits
    assert tokens(g.add([step(2)])) is None
    assert tokens(g.add([step(3)])) == [2, 3]  # the second reply carries two at most
    assert tokens(g.add([step(4)])) is None
    assert tokens(g.add([step(5)])) is None
    assert tokens(g.add([step(6)])) == [4, 5, 6]  # then the interval
    assert tokens(g.add([step(7), step(8), step(9)])) == [7, 8, 9]  # a backlog at once


def test_one_token_then_two_then_the_interval() -> None:
    g = gate(running=64)  # 16 tokens a reply
    sizes = []
    for t in range(1, 1 + 1 + 2 + 16 + 16):
        out = g.add([step(t)])
        if out is not None:
            sizes.append(len(tokens(out) or []))
    assert sizes == [1, 2, 16, 16]


def test_last_reply_never_waits() -> None:
    g = gate(running=16)  # 4 tokens a reply
    g.add([step(1)])
    assert g.add([step(2)]) is None
    out = g.add([step(3, finished=True)])
    assert tokens(out) == [2, 3] and out is not None and out[-1].finished


def test_the_interval_is_read_as_the_load_changes() -> None:
    running = [32]
    g = ReplyGate(StreamInterval(), lambda: running[0], Clock())
    for t in range(1, 4):  # the first reply (1 token) and the second (2)
        g.add([step(t)])
    assert [g.add([step(t)]) for t in range(4, 11)] == [None] * 7  # 8 a reply at 32
    running[0] = 4  # the batch drained: what is held goes with the next step
    assert tokens(g.add([step(11)])) == list(range(4, 12))


def test_lightly_loaded_engine_sends_every_step() -> None:
    g = gate(running=7, min_batch=8)
    assert [tokens(g.add([step(t)])) for t in (1, 2, 3)] == [[1], [2], [3]]


def test_interval_one_sends_every_step() -> None:
    g = gate(max_interval=1)
    assert [tokens(g.add([step(t)])) for t in (1, 2, 3)] == [[1], [2], [3]]


def test_held_tokens_go_out_with_the_first_step_past_the_hold_bound() -> None:
    clock = Clock()
    g = gate(clock=clock, max_hold_ms=100.0)  # 8 tokens a reply
    for t in range(1, 4):  # the first reply and the second
        g.add([step(t)])
    clock.now += 0.01
    assert g.add([step(4)]) is None  # held since t+10 ms
    clock.now += 0.099
    assert g.add([step(5)]) is None  # 99 ms held
    clock.now += 0.001
    assert tokens(g.add([step(6)])) == [4, 5, 6]  # 100 ms: due


def test_an_empty_delta_counts_no_tokens() -> None:
    g = gate(running=8)  # 2 tokens a reply
    g.add([step(1)])
    assert g.add([step()]) is None
    assert tokens(g.add([step(2), step(3)])) == [2, 3]


@pytest.mark.parametrize("policy", [{"max_interval": 0}, {"replies_per_step": 0},
                                    {"min_batch": 0}, {"max_hold_ms": -1.0}])
def test_bad_policy_is_refused(policy: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="stream interval"):
        StreamInterval(**policy)  # type: ignore[arg-type]


class _Stream:
    """An engine stream whose deltas are all waiting at once, one step each."""

    def __init__(self, deltas: list[Delta]) -> None:
        self._deltas = list(deltas)

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> Delta:
        if not self._deltas:
            raise StopAsyncIteration
        return self._deltas.pop(0)

    async def aclose(self) -> None:
        pass


class _Engine:
    def __init__(self, deltas: list[Delta], num_running: int) -> None:
        self.deltas, self.num_running = deltas, num_running

    def submit(self, prompt_ids: list[int], params: object, **kwargs: object) -> _Stream:
        return _Stream(self.deltas)

    def stats(self) -> object:
        return types.SimpleNamespace(num_running=self.num_running)


class _Context:
    async def send_initial_metadata(self, md: object) -> None:
        pass

    def invocation_metadata(self) -> tuple[()]:
        return ()


@pytest.mark.parametrize(("num_running", "replies"), [
    (2, [[1], [2], [3], [4], [5], [6], [7], []]),  # light load: every step
    # 3 tokens a reply after the first (1) and the second (2), the finish at once
    (12, [[1], [2, 3], [4, 5, 6], [7]]),
])
def test_the_worker_replies_per_the_interval(num_running: int,
                                             replies: list[list[int]]) -> None:
    from genmesh.v1 import worker_pb2
    from services.worker.servicer import WorkerServicer

    deltas = [step(t) for t in range(1, 8)] + [step(finished=True)]
    servicer = WorkerServicer(_Engine(deltas, num_running),  # type: ignore[arg-type]
                              model_name="m", model_version="v1",
                              stream_interval=StreamInterval())

    async def replies_of() -> list[list[int]]:
        return [list(r.token_ids) async for r in servicer.Generate(
            worker_pb2.WorkerGenerateRequest(prompt_ids=[1]),
            _Context())]  # type: ignore[arg-type]

    assert asyncio.run(replies_of()) == replies
