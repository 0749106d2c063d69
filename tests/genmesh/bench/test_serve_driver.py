"""`bench serve`'s load driver on fake backends: the concurrency cap, Poisson send
times, the duration limit, and turns never sent."""

from __future__ import annotations

import asyncio
import time

import pytest

from genmesh.bench.serve import LoadLevel, run_level
from genmesh.bench.serve_clients import OnRecord
from genmesh.bench.serve_metrics import RequestRecord, RequestStatus
from genmesh.bench.serve_workload import Conversation, poisson_arrivals


def conversations(n: int, turns: int = 1) -> list[Conversation]:
    return [Conversation(f"c{i}", "", tuple(f"turn {k}" for k in range(turns)))
            for i in range(n)]


class SleepyBackend:
    """Answers every turn after ``seconds``, with two chunks; counts turns in flight.
    ``fail_turn``: that turn (0-based) fails."""

    def __init__(self, seconds: float, *, fail_turn: int | None = None) -> None:
        self.seconds, self.fail_turn = seconds, fail_turn
        self.in_flight = self.max_in_flight = 0
        self.starts: list[float] = []

    async def converse(self, conversation: Conversation, on_record: OnRecord) -> None:
        for k in range(len(conversation.user_turns)):
            start = time.perf_counter()
            self.starts.append(start)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.seconds)
            finally:
                self.in_flight -= 1
            now = time.perf_counter()
            if k == self.fail_turn:
                on_record(RequestRecord(start, (), now, 0, 0, RequestStatus.FAILED, "boom"))
                return
            on_record(RequestRecord(start, (now, now), now, 5, 2))


def test_a_concurrency_level_keeps_that_many_in_flight():
    backend = SleepyBackend(0.02)
    records, duration_s = asyncio.run(run_level(
        backend, conversations(8), LoadLevel(concurrency=3), seed=0, duration_limit_s=10))
    assert len(records) == 8 and all(r.is_ok for r in records)
    assert backend.max_in_flight == 3
    assert 0.06 <= duration_s < 1.0  # ceil(8 / 3) rounds of 20 ms


def test_a_rate_level_sends_on_the_poisson_schedule():
    backend = SleepyBackend(0.001)
    level = LoadLevel(request_rate=20.0)
    t0 = time.perf_counter()
    asyncio.run(run_level(backend, conversations(5), level, seed=4, duration_limit_s=10))
    sent = [s - t0 for s in sorted(backend.starts)]
    expected = poisson_arrivals(5, 20.0, seed=4)
    assert sent == pytest.approx(expected, abs=0.05)


def test_the_duration_limit_cancels_what_still_runs():
    backend = SleepyBackend(30.0)
    t0 = time.perf_counter()
    records, duration_s = asyncio.run(run_level(
        backend, conversations(4, turns=2), LoadLevel(concurrency=2), seed=0,
        duration_limit_s=0.2))
    assert time.perf_counter() - t0 < 5
    assert len(records) == 8  # every turn is accounted for, sent or not
    assert all(r.status is RequestStatus.CANCELLED for r in records)
    assert duration_s == pytest.approx(0.2, abs=0.1)


def test_turns_after_a_failed_one_count_as_failed():
    backend = SleepyBackend(0.001, fail_turn=1)
    records, _ = asyncio.run(run_level(
        backend, conversations(2, turns=3), LoadLevel(concurrency=2), seed=0,
        duration_limit_s=10))
    assert sorted((r.status.value, r.error) for r in records) == sorted(
        [("ok", ""), ("failed", "boom"),
         ("failed", "an earlier turn of the conversation failed")] * 2)


def test_a_backend_exception_fails_its_conversation_only():
    class Broken:
        async def converse(self, conversation: Conversation, on_record: OnRecord) -> None:
            if conversation.conversation_id == "c0":
                raise ConnectionError("reset")
            now = time.perf_counter()
            on_record(RequestRecord(now, (now,), now, 1, 1))

    records, _ = asyncio.run(run_level(Broken(), conversations(3), LoadLevel(concurrency=1),
                                       seed=0, duration_limit_s=10))
    assert sorted(r.error for r in records) == ["", "", "ConnectionError: reset"]
