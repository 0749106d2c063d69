"""The budget stage over fake token budgets: prompt + max_tokens reserved before the rest
runs, the request's token count settled however it ended, refusals as the caller sees
them, and tenants without a budget skipping the stage."""

from __future__ import annotations

import grpc
import pytest

from genmesh.v1 import common_pb2
from services.frontend.admission import Admission, AdmissionPolicy
from services.frontend.errors import PipelineError
from services.frontend.events import Finished, Started, TextChunk
from services.frontend.stages.budget import ReserveBudget
from services.frontend.stages.call import Call, StageEvent
from tests.services.frontend.stages.fakes import (
    FakeBudgets,
    Upstream,
    call_of,
    collect,
    request,
    run,
)

STARTED = Started("r1", "m", "v1", 3)
STOP = Finished(common_pb2.FINISH_REASON_STOP)


def reserving(budgets: FakeBudgets, *, limit: int = 1000) -> ReserveBudget:
    policy = AdmissionPolicy(tenants={"acme": limit, "free": None})
    return ReserveBudget(Admission(policy, budgets))  # type: ignore[arg-type]


class Generating(Upstream):
    """The rest of the chain, adding one generated token per event (as generate does)."""

    def __call__(self, call: Call):  # type: ignore[override]
        self.call = call
        return super().__call__(call)

    async def _stream(self):  # type: ignore[override]
        async for event in super()._stream():
            self.call.tokens.num_generated += 1
            yield event


def test_reserves_prompt_plus_max_tokens_and_settles_the_tokens_used():
    budgets = FakeBudgets()
    upstream = Generating(STARTED, TextChunk("a"), TextChunk("b"), STOP)
    call = call_of(request(params=common_pb2.SamplingParams(max_tokens=20)),
                   prompt_ids=[1, 2, 3])
    events = run(collect(reserving(budgets).run(call, upstream)))
    assert events == [STARTED, TextChunk("a"), TextChunk("b"), STOP]
    assert budgets.log == [("reserve", 23), ("settle", 3 + 4)]
    assert call.observer.stages == ["budget"]  # type: ignore[attr-defined]


def test_a_request_that_fails_or_is_left_settles_what_it_used():
    budgets = FakeBudgets()
    upstream = Generating(STARTED, TextChunk("a"), TextChunk("b"), STOP)

    async def leave_after_two() -> list[StageEvent]:
        events = reserving(budgets).run(call_of(prompt_ids=[1, 2, 3]), upstream)
        seen = [await anext(events), await anext(events)]
        await events.aclose()
        return seen

    assert run(leave_after_two()) == [STARTED, TextChunk("a")]
    assert budgets.log == [("reserve", 3 + 8), ("settle", 3 + 2)]
    assert upstream.is_closed


def test_n_choices_reserve_the_prompt_once_and_every_choice_s_max_tokens():
    budgets = FakeBudgets()
    call = call_of(request(params=common_pb2.SamplingParams(max_tokens=20), n=3),
                   prompt_ids=[1, 2, 3])
    run(collect(reserving(budgets).run(call, Generating(STARTED, STOP))))
    assert budgets.log[0] == ("reserve", 3 + 3 * 20)


def test_max_tokens_unset_reserves_the_default():
    budgets = FakeBudgets()
    call = call_of(request(params=common_pb2.SamplingParams()), prompt_ids=[1])
    run(collect(reserving(budgets).run(call, Upstream(STARTED, STOP))))
    assert budgets.log[0] == ("reserve", 1 + 128)


def test_a_request_over_the_budget_is_refused_before_the_rest_runs():
    budgets, upstream = FakeBudgets(), Upstream(STARTED, STOP)
    with pytest.raises(PipelineError) as err:
        run(collect(reserving(budgets, limit=10).run(call_of(prompt_ids=[1, 2, 3]), upstream)))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "has 0 of its 10 tokens per minute left" in err.value.message
    assert err.value.retry_after_s == 1.0  # when the window resets (the fake's 1 s)
    assert budgets.log == [("reserve", 11)] and upstream.num_calls == 0


def test_a_tenant_without_a_budget_skips_the_stage():
    budgets, upstream = FakeBudgets(), Upstream(STARTED, STOP)
    call = call_of(request(tenant="free"), prompt_ids=[1])
    assert reserving(budgets).run(call, upstream) is upstream.stream
    assert budgets.log == []
