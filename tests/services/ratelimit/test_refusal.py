"""What a request over its limits is told (services/ratelimit/refusal.py)."""

from __future__ import annotations

import pytest

from services.ratelimit.limiter import NO_LIMIT, Decision, Descriptor
from services.ratelimit.limits import RateLimit, Unit
from services.ratelimit.refusal import Refusal, refusal, whole_seconds

DEV = Descriptor((("tenant", "dev"),))
PER_MINUTE = RateLimit(30, Unit.MINUTE, "tenant=dev")


def over(limit: RateLimit, reset_s: float) -> Decision:
    return Decision(limit=limit, is_over_limit=True, num_remaining=0, reset_s=reset_s)


def test_under_every_limit_there_is_nothing_to_say():
    admitted = Decision(limit=PER_MINUTE, num_remaining=3, reset_s=20.0)
    assert refusal([DEV, DEV], [admitted, NO_LIMIT]) is None


def test_a_refusal_names_the_limit_and_the_whole_seconds_to_its_windows_end():
    assert refusal([DEV], [over(PER_MINUTE, 41.2)]) == Refusal(
        "tenant 'dev' is over its requests_per_minute limit of 30, shared by all gateways; "
        "retry in 42 s",
        (("x-ratelimit-limit", "30"), ("x-ratelimit-remaining", "0"),
         ("x-ratelimit-reset", "42"), ("retry-after", "42")))


def test_over_several_limits_it_names_the_one_that_ends_last():
    per_second = RateLimit(5, Unit.SECOND)
    path = Descriptor((("tenant", "dev"), ("path", "/v1/chat")))
    refused = refusal([DEV, path], [over(PER_MINUTE, 41.2), over(per_second, 0.4)])
    assert refused is not None and refused.message.startswith(
        "tenant 'dev' is over its requests_per_minute limit of 30")
    refused = refusal([DEV, path], [over(per_second, 0.4), over(RateLimit(9, Unit.HOUR), 90.0)])
    assert refused is not None and refused.message == (
        "tenant 'dev', path '/v1/chat' is over its requests_per_hour limit of 9, shared by all "
        "gateways; retry in 90 s")


@pytest.mark.parametrize(("seconds", "whole"), [(0.000001, 1), (0.9, 1), (1.0, 1), (1.01, 2),
                                                (59.99, 60)])
def test_waits_round_up_so_that_a_retry_finds_the_window_ended(seconds, whole):
    assert whole_seconds(seconds) == whole
