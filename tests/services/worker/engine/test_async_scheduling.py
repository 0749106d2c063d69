"""Async scheduling: step N+1 is scheduled and launched before step N's tokens are read
back. Whatever the mix, every request must get exactly the tokens, finish reasons and
usage of the synchronous engine (on a CPU the same code runs, with nothing to overlap).
"""

from __future__ import annotations

import pytest

from services.worker.engine.core import EngineCore
from services.worker.engine.outputs import Delta, FinishReason
from services.worker.engine.params import SamplingParams
from tests.services.worker.engine.helpers import run_core, tiny_core


def core(*, async_scheduling: bool, **overrides: object) -> EngineCore:
    return tiny_core(**{"max_num_batched_tokens": 32, "async_scheduling": async_scheduling,
                        **overrides})


run = run_core


def summary(deltas: dict[str, list[Delta]]) -> dict[str, tuple]:
    result = {}
    for rid, ds in deltas.items():
        last = ds[-1]
        assert last.finished and all(not d.finished for d in ds[:-1])
        tokens = [t for d in ds for t in d.new_token_ids]
        logprobs = [(lp.token_id, round(lp.logprob, 4)) for d in ds for lp in d.logprobs or []]
        assert last.usage is not None
        result[rid] = (tokens, last.finish_reason, last.usage, logprobs)
    return result


def greedy(n: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True, **kw)  # type: ignore[arg-type]


MIX = {
    "short": ([5, 6, 7], greedy(7)),
    "long": ([10 + i for i in range(45)], greedy(12)),  # chunked prefill (32-token budget)
    "one": ([42], greedy(1)),
    "seeded": ([3, 4, 5, 6, 7], SamplingParams(max_tokens=9, temperature=0.9, top_p=0.9,
                                                 seed=7, ignore_eos=True)),
    "penalty": ([8, 8, 9, 9], greedy(8, repetition_penalty=1.3)),
    "logprobs": ([11, 12, 13, 14, 15, 16, 17, 18, 19], greedy(6, logprobs=3)),
}


def test_async_gives_the_synchronous_engines_outputs():
    want = summary(run(core(async_scheduling=False), MIX))
    got = summary(run(core(async_scheduling=True), MIX))
    assert got == want


def test_a_stop_token_found_late_discards_the_step_already_launched():
    sync = summary(run(core(async_scheduling=False), {"p": ([1, 2, 3], greedy(12))}))
    tokens = sync["p"][0]
    stop_at = tokens[4]  # stop on the 5th generated token (it ends the output)
    first = tokens.index(stop_at)
    params = SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=(stop_at,))
    eng = core(async_scheduling=True)
    got = summary(run(eng, {"p": ([1, 2, 3], params)}))["p"]
    assert got[0] == tokens[:first + 1] and got[1] is FinishReason.STOP
    assert got[2].completion_tokens == first + 1
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks  # nothing left behind


def test_preemption_in_a_small_pool_keeps_outputs_exact():
    reqs = {f"r{i}": ([20 + i] * (6 + 3 * i), greedy(10)) for i in range(6)}
    want = summary(run(core(async_scheduling=False, num_kv_blocks=14), reqs))
    eng = core(async_scheduling=True, num_kv_blocks=14)
    got = summary(run(eng, reqs))
    assert got == want
    assert eng.scheduler.num_preemptions > 0


@pytest.mark.parametrize("after", [1, 3])
def test_an_abort_while_a_step_is_in_flight_reports_the_tokens_delivered(after):
    eng = core(async_scheduling=True)
    deltas = run(eng, {"a": ([1, 2, 3, 4], greedy(20)), "b": ([9, 9], greedy(6))},
                 abort_after={"a": after})
    final = deltas["a"][-1]
    assert final.finish_reason is FinishReason.ABORT
    delivered = sum(len(d.new_token_ids) for d in deltas["a"])
    assert final.usage is not None and final.usage.completion_tokens == delivered
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks


def test_overlapping_steps_charge_each_second_once():
    eng = core(async_scheduling=True)
    deltas = run(eng, MIX)
    shares = [ds[-1].timings.device_seconds for ds in deltas.values()
              if ds[-1].timings is not None]
    assert len(shares) == len(MIX) and all(s > 0 for s in shares)
    # The lookahead steps of requests that had ended are wasted work: in the total only.
    # (Up to float rounding: the shares and the total add the same seconds in other orders.)
    assert sum(shares) <= eng.stats().device_seconds * (1 + 1e-12)
    assert not eng.has_work()


def test_a_new_request_reusing_an_id_in_flight_keeps_its_own_prompt():
    def reuse(engine: EngineCore) -> list[int]:
        engine.add(engine.make_request("x", [1, 2, 3, 4], greedy(20)))
        for _ in range(4):
            engine.step()
        assert engine.abort("x") is not None  # its last step is still in flight
        out = run(engine, {"x": ([50, 60, 70], greedy(6))})
        return [t for d in out["x"] for t in d.new_token_ids]

    fresh = summary(run(core(async_scheduling=False), {"x": ([50, 60, 70], greedy(6))}))
    assert reuse(core(async_scheduling=True)) == fresh["x"][0]


def computed_tokens(engine: EngineCore) -> list[int]:
    """Records the number of tokens every model run computes."""
    counts: list[int] = []
    run_model = engine.runner.run

    def counting(inputs):  # type: ignore[no-untyped-def]
        counts.append(inputs.num_tokens)
        return run_model(inputs)

    engine.runner.run = counting  # type: ignore[method-assign]
    return counts


def test_no_lookahead_step_for_a_request_its_pending_token_ends():
    reqs = {f"r{i}": ([30 + i] * (3 + i), greedy(4 + i)) for i in range(5)}
    sync, fast = core(async_scheduling=False), core(async_scheduling=True)
    sync_counts, fast_counts = computed_tokens(sync), computed_tokens(fast)
    assert summary(run(fast, reqs)) == summary(run(sync, reqs))
    # Every request ends by length: async computes exactly the tokens sync does.
    assert sum(fast_counts) == sum(sync_counts)
    assert fast.sampler._unseeded == {}
