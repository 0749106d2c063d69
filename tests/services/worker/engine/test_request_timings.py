"""Request stage times and device-time shares, on a fake clock: exact numbers."""

from __future__ import annotations

import pytest

from services.worker.engine.config import EngineConfig
from services.worker.engine.core import EngineCore
from services.worker.engine.outputs import Delta, FinishReason, RequestTimings
from services.worker.engine.params import SamplingParams

STEP_S = 3.0  # every model run takes this long on the fake clock


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clocked() -> tuple[EngineCore, FakeClock]:
    clock = FakeClock()
    # A step computes at most 3 tokens, so two 2-token prompts split a step 2:1.
    core = EngineCore(EngineConfig(model="tiny-llama", load_format="dummy", dtype="float32",
                                   num_kv_blocks=16, block_size=4, max_num_batched_tokens=3),
                      clock=clock)
    run = core.runner.run

    def slow_run(*args, **kwargs):  # type: ignore[no-untyped-def]
        logits = run(*args, **kwargs)
        clock.now += STEP_S
        return logits

    core.runner.run = slow_run  # type: ignore[method-assign]
    return core, clock


def submit(core: EngineCore, rid: str, prompt: list[int], max_tokens: int) -> None:
    core.add(core.make_request(rid, prompt, SamplingParams(max_tokens=max_tokens,
                                                           ignore_eos=True)))


def finals(deltas: list[Delta]) -> dict[str, RequestTimings]:
    return {d.request_id: d.timings for d in deltas if d.finished and d.timings is not None}


def test_device_time_is_split_by_tokens_and_stages_follow_the_clock(clocked):
    core, clock = clocked
    submit(core, "a", [5, 6], max_tokens=2)
    submit(core, "b", [7, 8], max_tokens=1)
    clock.now = 1.0  # both waited a second

    # Step 1 (t 1 -> 4): a's prompt (2 tokens) and half of b's (1 token); a samples.
    assert finals(core.step()) == {}
    # Step 2 (t 4 -> 7): a decodes 1 token, b finishes its prompt with 1; both end.
    done = finals(core.step())

    assert done["a"] == RequestTimings(arrival_time=0.0, queue_s=1.0, prefill_s=3.0,
                                       decode_s=3.0, device_seconds=2.0 + 1.5)
    assert done["b"] == RequestTimings(arrival_time=0.0, queue_s=1.0, prefill_s=6.0,
                                       decode_s=0.0, device_seconds=1.0 + 1.5)
    assert done["a"].finished_time == done["b"].finished_time == 7.0
    assert core.stats().device_seconds == 2 * STEP_S  # the shares add up to the steps


def test_a_request_aborted_while_waiting_spent_everything_queued(clocked):
    core, clock = clocked
    submit(core, "a", [5, 6], max_tokens=1)
    clock.now = 2.5
    delta = core.abort("a")
    assert delta is not None and delta.finish_reason is FinishReason.ABORT
    assert delta.timings == RequestTimings(arrival_time=0.0, queue_s=2.5, prefill_s=0.0,
                                           decode_s=0.0, device_seconds=0.0)


def test_an_aborted_request_keeps_the_device_time_it_used(clocked):
    core, _ = clocked
    submit(core, "a", [5, 6, 7, 8, 9], max_tokens=4)  # a 5-token prompt: two steps
    core.step()  # 3 of its tokens: the whole step
    delta = core.abort("a")
    assert delta is not None and delta.timings is not None
    assert delta.timings.device_seconds == STEP_S
    assert (delta.timings.queue_s, delta.timings.prefill_s) == (0.0, STEP_S)
