"""Token budgets against a real redis-server: atomic reservations under concurrency,
exact refunds, window rollover, and Redis failing (killed, hung) and coming back."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from genmesh.core.failure import FailureMode
from services.frontend.budget import (
    BudgetExceeded,
    BudgetPolicy,
    BudgetUnavailable,
    RequestTooLarge,
    Reservation,
    TokenBudgets,
    budget_key,
    redis_client,
)
from tests.procs import RedisServer

TIMEOUT_S = 0.5  # every Redis call's bound in these tests


@asynccontextmanager
async def budgets_on(server: RedisServer, *, failure_mode: FailureMode = FailureMode.CLOSED,
                     window_s: int = 60) -> AsyncIterator[TokenBudgets]:
    """One frontend's view of the budgets: its own client and connection pool."""
    client = redis_client(server.url, timeout_s=TIMEOUT_S)
    try:
        yield TokenBudgets(client, timeout_s=TIMEOUT_S, failure_mode=failure_mode,
                           window_s=window_s)
    finally:
        await client.aclose()


async def seconds_left_in_window(budgets: TokenBudgets) -> float:
    sec, usec = await budgets.client.time()
    return budgets.window_s - sec % budgets.window_s - usec / 1e6


async def start_of_fresh_window(budgets: TokenBudgets, *, margin_s: float) -> None:
    """Sleeps into the next window when fewer than ``margin_s`` remain of this one, so a
    test's reservations all land in one window."""
    left = await seconds_left_in_window(budgets)
    if left < margin_s:
        await asyncio.sleep(left + 0.02)


async def used_in_window(budgets: TokenBudgets, reservation: Reservation) -> int:
    used = await budgets.client.hget(budget_key(reservation.tenant, reservation.window_start),
                                     "used")
    return int(used or 0)


async def reserve_or_error(budgets: TokenBudgets, tenant: str, num_tokens: int,
                           policy: BudgetPolicy) -> Reservation | BudgetExceeded:
    try:
        return await budgets.reserve(tenant, num_tokens, policy)
    except BudgetExceeded as exc:
        return exc


def test_fifty_concurrent_reservations_from_five_frontends_never_exceed_the_budget(redis_server):
    policy = BudgetPolicy(tokens_per_minute=1000)

    async def main() -> None:
        async with (budgets_on(redis_server) as a, budgets_on(redis_server) as b,
                    budgets_on(redis_server) as c, budgets_on(redis_server) as d,
                    budgets_on(redis_server) as e):
            frontends = [a, b, c, d, e]
            await start_of_fresh_window(a, margin_s=5)
            outcomes = await asyncio.gather(*(
                reserve_or_error(frontends[i % 5], "acme", 30, policy) for i in range(50)))
            admitted = [o for o in outcomes if isinstance(o, Reservation)]
            refused = [o for o in outcomes if isinstance(o, BudgetExceeded)]
            assert (len(admitted), len(refused)) == (33, 17)  # 33 × 30 = 990 ≤ 1000 < 34 × 30
            assert len({r.window_start for r in admitted}) == 1
            assert await used_in_window(a, admitted[0]) == 990
            # Every refusal came after the 33rd admission, when exactly 10 were free.
            assert {(x.num_free_tokens, x.limit, x.num_requested_tokens) for x in refused} == {
                (10, 1000, 30)}
            assert all(0 < x.reset_in_s <= 60 for x in refused)

    asyncio.run(main())


def test_concurrent_reservations_of_mixed_sizes_never_exceed_the_budget(redis_server):
    policy = BudgetPolicy(tokens_per_minute=1000)
    sizes = [random.Random(seed).randint(1, 120) for seed in range(50)]

    async def main() -> None:
        async with budgets_on(redis_server) as a, budgets_on(redis_server) as b:
            await start_of_fresh_window(a, margin_s=5)
            outcomes = await asyncio.gather(*(
                reserve_or_error((a, b)[i % 2], "acme", n, policy) for i, n in enumerate(sizes)))
            admitted = [o for o in outcomes if isinstance(o, Reservation)]
            total = sum(r.num_reserved_tokens for r in admitted)
            assert total <= 1000
            assert await used_in_window(a, admitted[0]) == total
            for size, outcome in zip(sizes, outcomes, strict=True):
                if isinstance(outcome, BudgetExceeded):  # refused only what truly did not fit
                    assert size > outcome.num_free_tokens >= 1000 - total

    asyncio.run(main())


def test_settle_refunds_exactly_the_unused_part_once(redis_server):
    policy = BudgetPolicy(tokens_per_minute=100)

    async def main() -> None:
        async with budgets_on(redis_server) as budgets:
            await start_of_fresh_window(budgets, margin_s=5)
            # prompt 20 + max_tokens 80 reserved; the request generated 35 and stopped.
            reservation = await budgets.reserve("acme", 100, policy)
            assert await reservation.settle(20 + 35) == 45
            assert await used_in_window(budgets, reservation) == 55
            assert await reservation.settle(20 + 35) == 0  # a second settle refunds nothing
            assert await reservation.settle(0) == 0
            assert await used_in_window(budgets, reservation) == 55
            # Exactly the refund is free again: 45 fit, 46 do not.
            with pytest.raises(BudgetExceeded) as refused:
                await budgets.reserve("acme", 46, policy)
            assert refused.value.num_free_tokens == 45
            second = await budgets.reserve("acme", 45, policy)
            # Two settles racing (say, a retry) refund once between them.
            assert sorted(await asyncio.gather(second.settle(5), second.settle(5))) == [0, 40]
            assert await used_in_window(budgets, reservation) == 60

    asyncio.run(main())


def test_using_more_than_reserved_refunds_nothing_and_charges_nothing_more(redis_server):
    async def main() -> None:
        async with budgets_on(redis_server) as budgets:
            await start_of_fresh_window(budgets, margin_s=5)
            reservation = await budgets.reserve("acme", 50, BudgetPolicy(tokens_per_minute=100))
            assert await reservation.settle(70) == 0
            assert await used_in_window(budgets, reservation) == 50

    asyncio.run(main())


def test_a_request_larger_than_the_whole_budget_gets_its_own_error(redis_server):
    policy = BudgetPolicy(tokens_per_minute=100)

    async def main() -> None:
        async with budgets_on(redis_server) as budgets:
            with pytest.raises(RequestTooLarge) as too_large:
                await budgets.reserve("acme", 101, policy)
            assert not isinstance(too_large.value, BudgetExceeded)
            assert (too_large.value.limit, too_large.value.num_requested_tokens) == (100, 101)
            assert "lower max_tokens" in too_large.value.message
            assert await budgets.client.keys("genmesh:budget:*") == []  # nothing was charged
            reservation = await budgets.reserve("acme", 100, policy)  # the whole budget fits
            assert reservation.num_reserved_tokens == 100

    asyncio.run(main())


def test_tenants_have_separate_budgets(redis_server):
    policy = BudgetPolicy(tokens_per_minute=100)

    async def main() -> None:
        async with budgets_on(redis_server) as budgets:
            await start_of_fresh_window(budgets, margin_s=5)
            await budgets.reserve("acme", 100, policy)
            with pytest.raises(BudgetExceeded, match="'acme' has 0 of its 100 tokens"):
                await budgets.reserve("acme", 1, policy)
            assert (await budgets.reserve("globex", 100, policy)).tenant == "globex"

    asyncio.run(main())


def test_a_new_window_resets_the_budget_and_refunds_go_to_the_window_charged(redis_server):
    policy = BudgetPolicy(tokens_per_minute=100)

    async def main() -> None:
        async with budgets_on(redis_server, window_s=2) as budgets:
            await start_of_fresh_window(budgets, margin_s=1.5)
            first = await budgets.reserve("acme", 100, policy)
            with pytest.raises(BudgetExceeded) as refused:
                await budgets.reserve("acme", 1, policy)
            assert 0 < refused.value.reset_in_s <= 2
            await asyncio.sleep(refused.value.reset_in_s + 0.02)
            second = await budgets.reserve("acme", 100, policy)
            assert second.window_start == first.window_start + 2
            # The first request ends now, in the second window: its refund goes back to
            # the first window and frees nothing in this one.
            assert await first.settle(10) == 90
            assert await used_in_window(budgets, first) == 10
            assert await used_in_window(budgets, second) == 100
            with pytest.raises(BudgetExceeded):
                await budgets.reserve("acme", 1, policy)

    asyncio.run(main())


def test_window_keys_expire_and_a_refund_after_expiry_is_harmless(redis_server):
    async def main() -> None:
        async with budgets_on(redis_server) as budgets:
            reservation = await budgets.reserve("acme", 50, BudgetPolicy(tokens_per_minute=100))
            key = budget_key("acme", reservation.window_start)
            assert 0 < await budgets.client.ttl(key) <= 60 + 5
            await budgets.client.delete(key)  # what the expiry does
            assert await reservation.settle(0) == 0
            assert await budgets.client.exists(key) == 0  # the refund recreated nothing

    asyncio.run(main())


def test_redis_killed_fail_closed_raises_unavailable_within_the_timeout(redis_server):
    async def main() -> None:
        async with budgets_on(redis_server, failure_mode=FailureMode.CLOSED) as budgets:
            reservation = await budgets.reserve("acme", 50, BudgetPolicy(tokens_per_minute=100))
            redis_server.kill()
            t0 = time.monotonic()
            with pytest.raises(BudgetUnavailable, match="retry shortly") as unavailable:
                await budgets.reserve("acme", 10, BudgetPolicy(tokens_per_minute=100))
            assert time.monotonic() - t0 < TIMEOUT_S + 0.2
            assert unavailable.value.tenant == "acme"
            assert await reservation.settle(0) == 0  # a lost refund never raises
            assert budgets.num_lost_refunds == 1

    asyncio.run(main())


def test_redis_killed_fail_open_admits_unreserved_counts_and_warns_once(redis_server, caplog):
    caplog.set_level(logging.WARNING, logger="genmesh.frontend.budget")

    async def main() -> None:
        async with budgets_on(redis_server, failure_mode=FailureMode.OPEN) as budgets:
            redis_server.kill()
            t0 = time.monotonic()
            reservations = [await budgets.reserve("acme", 10, BudgetPolicy(tokens_per_minute=100))
                            for _ in range(3)]
            assert time.monotonic() - t0 < 3 * TIMEOUT_S + 0.2
            assert all(not r.is_reserved and r.num_reserved_tokens == 0 for r in reservations)
            assert budgets.num_unreserved_admissions == 3
            assert await reservations[0].settle(5) == 0
            assert budgets.num_lost_refunds == 0  # nothing was reserved, nothing to lose

    asyncio.run(main())
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "admitted tenant 'acme' unreserved" in warnings[0]


def test_a_hung_redis_fails_within_the_timeout_in_both_modes(redis_server):
    policy = BudgetPolicy(tokens_per_minute=100)

    async def main() -> None:
        async with (budgets_on(redis_server, failure_mode=FailureMode.CLOSED) as closed,
                    budgets_on(redis_server, failure_mode=FailureMode.OPEN) as open_):
            reservation = await closed.reserve("acme", 50, policy)
            await open_.client.ping()  # open a pooled connection before the hang
            redis_server.pause()
            try:
                t0 = time.monotonic()
                with pytest.raises(BudgetUnavailable, match="no reply from Redis within"):
                    await closed.reserve("acme", 10, policy)
                assert not (await open_.reserve("acme", 10, policy)).is_reserved
                assert await reservation.settle(0) == 0
                assert time.monotonic() - t0 < 3 * TIMEOUT_S + 0.3
                assert (open_.num_unreserved_admissions, closed.num_lost_refunds) == (1, 1)
            finally:
                redis_server.resume()
            assert (await closed.reserve("acme", 10, policy)).is_reserved

    asyncio.run(main())


def test_budgets_recover_after_redis_restarts(redis_server):
    policy = BudgetPolicy(tokens_per_minute=100)

    async def main() -> None:
        async with budgets_on(redis_server) as budgets:
            assert (await budgets.reserve("acme", 60, policy)).is_reserved
            redis_server.kill()
            with pytest.raises(BudgetUnavailable):
                await budgets.reserve("acme", 10, policy)
            redis_server.start()  # same port, empty: no data, no cached scripts
            reservation = await budgets.reserve("acme", 100, policy)
            assert reservation.is_reserved
            assert await reservation.settle(30) == 70

    asyncio.run(main())
