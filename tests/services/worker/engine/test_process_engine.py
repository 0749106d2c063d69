"""The engine core in its own process: the same API and outputs as the thread-backed one,
and a child that dies fails its streams instead of hanging them."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from services.worker.engine.async_engine import AsyncEngine
from services.worker.engine.config import EngineConfig
from services.worker.engine.outputs import FinishReason
from services.worker.engine.params import InvalidRequestError, SamplingParams
from services.worker.engine.process_engine import EngineProcessError, ProcessEngine
from tests.services.worker.engine.helpers import collect

TINY = EngineConfig(model="tiny-llama", load_format="dummy", dtype="float32",
                    num_kv_blocks=64, max_num_batched_tokens=64)
PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 60)), [3] * 17]


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def eng():
    e = ProcessEngine(TINY)
    yield e
    e.shutdown()


def outputs(e, params: SamplingParams) -> list[tuple[list[int], FinishReason | None, int]]:
    async def main():
        return await asyncio.gather(*(collect(e.submit(p, params)) for p in PROMPTS))

    return [(tokens, last.finish_reason, last.usage.completion_tokens)
            for tokens, last in asyncio.run(main())]


def test_the_same_tokens_as_the_engine_on_a_thread(eng):
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.8, seed=7)
    thread = AsyncEngine(TINY)
    try:
        expected = outputs(thread, params)
    finally:
        thread.shutdown()
    got = outputs(eng, params)
    assert got == expected
    assert [n for _, _, n in got] == [12, 12, 12]
    assert eng.max_model_len == thread.max_model_len and eng.vocab_size == thread.vocab_size


def test_bad_input_is_refused_in_the_caller_naming_the_field(eng):
    async def main():
        with pytest.raises(InvalidRequestError) as bad_token:
            eng.submit([eng.vocab_size], SamplingParams(max_tokens=2))
        with pytest.raises(InvalidRequestError) as bad_temp:
            eng.submit([1, 2], SamplingParams(max_tokens=2, temperature=-1.0))
        return bad_token.value.field, bad_temp.value.field

    assert asyncio.run(main()) == ("prompt_ids", "temperature")


def test_leaving_a_stream_aborts_its_request_and_stats_come_from_the_child(eng):
    async def main():
        stream = eng.submit(list(range(100, 140)), SamplingParams(max_tokens=400,
                                                                   ignore_eos=True))
        async for delta in stream:
            if delta.new_token_ids:
                break
        await stream.aclose()

    asyncio.run(main())
    wait_for(lambda: eng.stats().num_running == 0 and eng.stats().num_waiting == 0)
    assert eng.stats().num_kv_blocks_free == eng.stats().num_kv_blocks_total


def test_a_late_close_of_a_finished_stream_spares_a_new_request_with_the_same_id(eng):
    async def main():
        first = eng.submit([100, 101], SamplingParams(max_tokens=2, ignore_eos=True),
                           request_id="job-1")
        await collect(first)
        second = eng.submit([100, 101], SamplingParams(max_tokens=6, ignore_eos=True),
                            request_id="job-1")
        eng._close_stream("job-1", first._sink)
        return await collect(second)

    tokens, last = asyncio.run(main())
    assert last.finish_reason is FinishReason.LENGTH and len(tokens) == 6


def test_a_core_that_fails_to_start_says_why():
    with pytest.raises(EngineProcessError, match="the engine failed to start"):
        ProcessEngine(EngineConfig(model="/nonexistent/model"))


def test_a_killed_core_fails_open_streams_refuses_new_ones_and_tells_the_worker():
    exits: list[str] = []
    e = ProcessEngine(TINY, on_exit=exits.append)
    try:
        async def main():
            stream = e.submit(list(range(200, 240)), SamplingParams(max_tokens=100_000,
                                                                     ignore_eos=True))
            async for delta in stream:
                if delta.new_token_ids:
                    os.kill(e._process.pid, signal.SIGKILL)
                if delta.finished:
                    return delta
            raise AssertionError("no final delta")

        last = asyncio.run(asyncio.wait_for(main(), 30))
        assert last.finish_reason is FinishReason.ERROR
        assert "the engine process exited (code -9)" in last.error

        async def again():
            e.submit([1, 2], SamplingParams(max_tokens=2))

        with pytest.raises(RuntimeError, match=r"the engine process exited \(code -9\)"):
            asyncio.run(again())
        wait_for(lambda: exits == ["the engine process exited (code -9)"])
    finally:
        e.shutdown(timeout=5)


def test_shutdown_ends_every_open_stream():
    exits: list[str] = []
    e = ProcessEngine(TINY, on_exit=exits.append)

    async def main():
        stream = e.submit(list(range(300, 340)), SamplingParams(max_tokens=100_000,
                                                                 ignore_eos=True))
        async for delta in stream:
            if delta.new_token_ids:
                await asyncio.to_thread(e.shutdown)
            if delta.finished:
                return delta
        raise AssertionError("no final delta")

    last = asyncio.run(asyncio.wait_for(main(), 30))
    assert last.finish_reason is FinishReason.ERROR
    assert not e._process.is_alive()
    assert exits == []  # a shutdown is not an unexpected exit
