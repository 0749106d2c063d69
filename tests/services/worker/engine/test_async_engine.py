"""The asyncio API on the real default model: streaming, abort, bad input, seeds, salts."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from services.worker.engine.outputs import FinishReason
from services.worker.engine.params import InvalidRequestError, SamplingParams
from tests.services.worker.engine.helpers import collect, engine, run_all


@pytest.fixture(scope="module")
def eng(model_dir):
    e = engine(model_dir, dtype="bfloat16", max_num_batched_tokens=256)
    yield e
    e.shutdown()


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_stream_yields_one_token_per_delta_and_usage_at_the_end(eng):
    async def main():
        deltas = [d async for d in eng.submit(list(range(1000, 1020)),
                                              SamplingParams(max_tokens=5, ignore_eos=True))]
        return deltas

    deltas = asyncio.run(main())
    assert [len(d.new_token_ids) for d in deltas] == [1] * 5
    assert [d.finish_reason for d in deltas] == [None] * 4 + [FinishReason.LENGTH]
    usage = deltas[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (20, 5)


def test_abort_frees_the_requests_blocks_within_a_step(eng):
    idle_free = eng.stats().num_kv_blocks_free

    async def main():
        stream = eng.submit(list(range(2000, 2300)), SamplingParams(max_tokens=500,
                                                                    ignore_eos=True),
                            request_id="to-abort")
        got = 0
        async for delta in stream:
            got += len(delta.new_token_ids)
            if got == 3:
                t0 = time.perf_counter()
                eng.abort("to-abort")
            if delta.finished:
                return delta, time.perf_counter() - t0
        raise AssertionError("stream ended without a final delta")

    last, seconds = asyncio.run(main())
    assert last.finish_reason is FinishReason.ABORT
    assert seconds < 1.0
    wait_for(lambda: eng.stats().num_running == 0)
    assert eng.stats().num_kv_blocks_free == idle_free


def test_leaving_the_stream_early_aborts_the_request(eng):
    async def main():
        stream = eng.submit(list(range(3000, 3100)), SamplingParams(max_tokens=400,
                                                                    ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(main())
    wait_for(lambda: eng.stats().num_running == 0 and eng.stats().num_waiting == 0)


@pytest.mark.parametrize(("prompt", "params", "field"), [
    ([], SamplingParams(), "prompt_ids"),
    ([5] * 9000, SamplingParams(), "prompt_ids"),
    ([5, 10**9], SamplingParams(), "prompt_ids"),
    ([5, -1], SamplingParams(), "prompt_ids"),
    ([5], SamplingParams(max_tokens=0), "max_tokens"),
    ([5], SamplingParams(temperature=-0.5), "temperature"),
    ([5], SamplingParams(top_p=0.0), "top_p"),
    ([5], SamplingParams(top_p=1.5), "top_p"),
])
def test_bad_input_is_refused_naming_the_field_and_the_engine_keeps_serving(
        eng, prompt, params, field):
    async def main():
        with pytest.raises(InvalidRequestError) as err:
            eng.submit(prompt, params)
        assert err.value.field == field
        tokens, last = await collect(eng.submit([1000, 1001, 1002],
                                                SamplingParams(max_tokens=2, ignore_eos=True)))
        assert len(tokens) == 2 and last.finish_reason is FinishReason.LENGTH

    asyncio.run(main())


SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=42, ignore_eos=True)


def test_same_seed_same_tokens_different_seed_different_tokens(eng):
    prompt = list(range(4000, 4030))
    runs = []
    for params in (SEEDED, SEEDED, replace(SEEDED, seed=7)):
        eng.reset_prefix_cache()  # identical conditions: no prefix hit on the rerun
        runs.append(run_all(eng, [prompt], params)[0][0])
    assert runs[0] == runs[1]
    assert runs[2] != runs[0]


def test_same_seed_same_tokens_whatever_shares_the_batch(model_dir):
    # fp32, so that a different batch shape cannot flip a draw through rounding.
    fp32 = engine(model_dir, enable_prefix_caching=False)
    try:
        prompt = list(range(4000, 4030))
        [(alone, _)] = run_all(fp32, [prompt], SEEDED)
        crowd = [prompt] + [list(range(5000 + 50 * i, 5020 + 50 * i)) for i in range(5)]
        together = run_all(fp32, crowd, SEEDED)
    finally:
        fp32.shutdown()
    assert together[0][0] == alone


def test_cache_salt_isolates_prefixes(eng):
    prompt = list(range(6000, 6100))
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    first = run_all(eng, [prompt], params, salts=["tenant-a"])
    same = run_all(eng, [prompt], params, salts=["tenant-a"])
    other = run_all(eng, [prompt], params, salts=["tenant-b"])
    assert first[0][1].usage.cached_prompt_tokens == 0
    assert same[0][1].usage.cached_prompt_tokens == 96  # 6 full blocks of 16
    assert other[0][1].usage.cached_prompt_tokens == 0


def test_stats_report_load_and_prefix_hits(eng):
    stats = eng.stats()
    assert stats.num_kv_blocks_total > 0
    assert 0 <= stats.num_kv_blocks_free <= stats.num_kv_blocks_total
    assert stats.prefix_cache_hits > 0 and 0 < stats.prefix_cache_hit_rate < 1
    assert stats.num_steps > 0 and stats.mean_step_ms > 0


def test_no_block_leaks_after_300_requests_with_random_aborts_through_the_async_api():
    import random

    from services.worker.engine.async_engine import AsyncEngine
    from services.worker.engine.config import EngineConfig

    tiny = AsyncEngine(EngineConfig(model="tiny-llama", load_format="dummy", dtype="float32",
                                    num_kv_blocks=64, block_size=4, max_num_seqs=16,
                                    max_num_batched_tokens=64))
    rng = random.Random(7)
    shared = [rng.randrange(3, 512) for _ in range(24)]

    async def one(i: int) -> None:
        prompt = (shared if i % 3 == 0 else []) + [rng.randrange(3, 512)
                                                   for _ in range(rng.randint(1, 40))]
        params = SamplingParams(max_tokens=rng.randint(1, 24), ignore_eos=True,
                                temperature=rng.choice([0.0, 0.8]), seed=i)
        stream = tiny.submit(prompt, params, request_id=f"r{i}")
        abort_after = rng.choice([None, 0, 1, 3])
        got = 0
        async for delta in stream:
            got += len(delta.new_token_ids)
            if abort_after is not None and got > abort_after and not delta.finished:
                if rng.random() < 0.5:
                    tiny.abort(f"r{i}")  # the stream then ends with ABORT
                else:
                    break  # leaving early aborts too
        await stream.aclose()

    async def main() -> None:
        for start in range(0, 300, 30):
            await asyncio.gather(*(one(i) for i in range(start, start + 30)))

    try:
        asyncio.run(main())
        wait_for(lambda: tiny.stats().num_running == 0 and tiny.stats().num_waiting == 0)
        stats = tiny.stats()
    finally:
        tiny.shutdown()
    assert stats.num_finished == 300
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0


def test_shutdown_ends_every_open_stream_even_one_never_started(model_dir):
    from services.worker.engine.async_engine import AsyncEngine
    from services.worker.engine.config import EngineConfig

    tiny = AsyncEngine(EngineConfig(model="tiny-llama", load_format="dummy", dtype="float32",
                                    num_kv_blocks=64))

    async def main():
        busy = tiny.submit([5, 6, 7], SamplingParams(max_tokens=1000, ignore_eos=True))
        await anext(busy)
        late = tiny.submit([8, 9], SamplingParams(max_tokens=1000, ignore_eos=True))
        tiny.shutdown()
        ends = []
        for stream in (busy, late):
            async for delta in stream:
                if delta.finished:
                    ends.append(delta.finish_reason)
        return ends

    ends = asyncio.run(asyncio.wait_for(main(), 10))
    assert ends == [FinishReason.ERROR, FinishReason.ERROR]
    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(_submit_one(tiny))


async def _submit_one(e):
    return e.submit([1], SamplingParams())


def test_a_dropped_stream_aborts_its_request_even_if_never_iterated(eng):
    async def main():
        stream = eng.submit(list(range(7000, 7050)), SamplingParams(max_tokens=400,
                                                                    ignore_eos=True))
        del stream  # never iterated

    asyncio.run(main())
    wait_for(lambda: eng.stats().num_running == 0 and eng.stats().num_waiting == 0)


def test_a_late_abort_from_a_finished_stream_spares_a_new_request_with_the_same_id(eng):
    async def main():
        first = eng.submit([1000, 1001], SamplingParams(max_tokens=2, ignore_eos=True),
                           request_id="job-1")
        deltas = [d async for d in first]
        assert deltas[-1].finished
        second = eng.submit([1000, 1001], SamplingParams(max_tokens=6, ignore_eos=True),
                            request_id="job-1")
        eng._close_stream("job-1", first._sink)  # what a stale close of `first` sends
        return await collect(second)

    tokens, last = asyncio.run(main())
    assert last.finish_reason is FinishReason.LENGTH and len(tokens) == 6


def test_generated_ids_never_collide_with_caller_ids(eng):
    async def main():
        mine = eng.submit([1000], SamplingParams(max_tokens=3, ignore_eos=True),
                          request_id="req-0")
        auto = eng.submit([1000], SamplingParams(max_tokens=3, ignore_eos=True))
        assert auto.request_id != "req-0"
        await collect(mine)
        await collect(auto)

    asyncio.run(main())


def test_bf16_on_plain_torch_ops_as_on_a_gpu(model_dir):
    """The path a CUDA worker takes (no CPU kernels): it must serve correctly too."""
    from tokenizers import Tokenizer

    plain = engine(model_dir, dtype="bfloat16", use_cpu_kernels=False)
    try:
        assert plain.core.runner.model.ops.decode_attention is None
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        prompt = tok.encode("The capital of France is").ids
        crowd = [prompt] + [list(range(1000 + 30 * i, 1020 + 30 * i)) for i in range(17)]
        results = run_all(plain, crowd, SamplingParams(max_tokens=3, ignore_eos=True))
    finally:
        plain.shutdown()
    assert tok.decode(results[0][0]).strip().startswith("Paris")
    assert all(len(tokens) == 3 for tokens, _ in results)
