"""The async jobs queue against a real redis-server: idempotent submit, job ids scoped by
tenant, take/finish/cancel, watching, expiry, takeover of a dead consumer's job, a chaos
run of consumers killed at random, and Redis failing (killed, hung, restarted empty)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as redis

from genmesh.v1 import generation_pb2
from services.frontend.budget import redis_client
from services.frontend.jobs import (
    TERMINAL,
    Claim,
    JobConflict,
    JobQueue,
    JobQueueConfig,
    JobRecord,
    JobState,
    JobStoreUnavailable,
    job_keys,
)
from tests.procs import RedisServer

TIMEOUT_S = 0.25  # the client's socket timeout in these tests
QUEUED, RUNNING = JobState.JOB_STATE_QUEUED, JobState.JOB_STATE_RUNNING
SUCCEEDED, FAILED = JobState.JOB_STATE_SUCCEEDED, JobState.JOB_STATE_FAILED
CANCELLED = JobState.JOB_STATE_CANCELLED
PREFIX = JobQueueConfig().prefix


def request(prompt: str = "Tell me about lighthouses.") -> bytes:
    return generation_pb2.GenerateRequest(prompt=prompt).SerializeToString()


def response(text: str = "They guide ships.") -> bytes:
    return generation_pb2.GenerateResponse(text=text, model="smollm2").SerializeToString()


@asynccontextmanager
async def client_on(server: RedisServer) -> AsyncIterator[redis.Redis]:
    """One frontend's Redis client and connection pool, as the frontend builds it."""
    client = redis_client(server.url, timeout_s=TIMEOUT_S)
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def queue_on(server: RedisServer, *, consumer: str = "frontend-a",
                   claim_timeout_s: float = 30.0) -> AsyncIterator[JobQueue]:
    async with client_on(server) as client:
        config = JobQueueConfig(claim_timeout_s=claim_timeout_s, result_ttl_s=60)
        yield JobQueue(client, config, consumer=consumer)


async def events_of(queue: JobQueue, job_id: str, tenant: str = "acme") -> list[int]:
    """The states in the job's events stream, oldest first."""
    entries = await queue.client.xrange(job_keys(PREFIX, tenant, job_id)[1])
    return [int(fields[b"state"]) for _, fields in entries]


async def take_now(queue: JobQueue) -> Claim:
    claim = await queue.take(block_ms=200)
    assert claim is not None
    return claim


async def collect(records: AsyncIterator[JobRecord]) -> list[JobRecord]:
    return [record async for record in records]


def test_submit_queues_a_job_once_per_id(redis_server):
    async def main() -> None:
        async with queue_on(redis_server) as queue:
            record = await queue.submit("job-1", request(), tenant="acme")
            assert (record.job_id, record.tenant, record.state) == ("job-1", "acme", QUEUED)
            assert (record.request, record.result, record.num_attempts) == (request(), b"", 0)
            assert (record.error_code, record.error) == (0, "")
            assert abs(record.created_ms - time.time() * 1000) < 5000  # Redis's clock
            assert record.updated_ms == record.created_ms
            assert await queue.submit("job-1", request(), tenant="acme") == record
            assert await queue.get("job-1", tenant="acme") == record
            assert await queue.client.xlen(f"{PREFIX}:stream") == 1
            assert await events_of(queue, "job-1") == [QUEUED]
            assert await queue.get("job-2", tenant="acme") is None

    asyncio.run(main())


def test_a_job_id_reused_by_the_same_tenant_for_another_request_conflicts(redis_server):
    async def main() -> None:
        async with queue_on(redis_server) as queue:
            original = await queue.submit("job-1", request("one"), tenant="acme")
            with pytest.raises(JobConflict, match="'job-1' is already used"):
                await queue.submit("job-1", request("two"), tenant="acme")
            assert await queue.submit("job-1", request("one"), tenant="acme") == original
            assert await queue.get("job-1", tenant="acme") == original
            assert await queue.client.xlen(f"{PREFIX}:stream") == 1

    asyncio.run(main())


def test_the_same_job_id_in_two_tenants_is_two_independent_jobs(redis_server):
    async def main() -> None:
        async with queue_on(redis_server) as queue:
            acme = await queue.submit("report-X", request("acme's"), tenant="acme")
            # Neither ALREADY_EXISTS nor acme's job: globex's own, new job.
            globex = await queue.submit("report-X", request("globex's"), tenant="globex")
            assert (globex.tenant, globex.request, globex.state) == (
                "globex", request("globex's"), QUEUED)
            assert await queue.submit("report-X", request("globex's"), tenant="globex") == globex
            with pytest.raises(JobConflict):  # conflicts stay within a tenant
                await queue.submit("report-X", request("acme's"), tenant="globex")
            assert await queue.get("report-X", tenant="acme") == acme
            assert await queue.get("report-X", tenant="globex") == globex
            assert await queue.get("report-X", tenant="initech") is None
            assert await queue.client.xlen(f"{PREFIX}:stream") == 2

            # Each runs and ends on its own, with its own result.
            claims = {c.tenant: c for c in [await take_now(queue), await take_now(queue)]}
            assert sorted(claims) == ["acme", "globex"]
            assert claims["acme"].record.request == request("acme's")
            assert claims["globex"].record.request == request("globex's")
            assert await queue.finish(claims["globex"], result=response("globex's")) is True
            done = await queue.get("report-X", tenant="globex")
            assert done is not None and (done.state, done.result) == (
                SUCCEEDED, response("globex's"))
            running = await queue.get("report-X", tenant="acme")
            assert running is not None and (running.state, running.result) == (RUNNING, b"")
            assert await queue.heartbeat(claims["acme"]) is True

            # A cancel or a watch reaches only the caller's tenant's job.
            assert await queue.cancel("report-X", tenant="initech") is None
            assert await collect(queue.watch("report-X", tenant="initech", timeout_s=1)) == []
            cancelled = await queue.cancel("report-X", tenant="acme")
            assert cancelled is not None and cancelled.state == CANCELLED
            assert await queue.get("report-X", tenant="globex") == done
            assert await collect(queue.watch("report-X", tenant="globex", timeout_s=1)) == [
                done]
            assert await queue.finish(claims["acme"], result=response("late")) is False
            assert await events_of(queue, "report-X", "acme") == [QUEUED, RUNNING, CANCELLED]
            assert await events_of(queue, "report-X", "globex") == [QUEUED, RUNNING, SUCCEEDED]

    asyncio.run(main())


@pytest.mark.parametrize(("tenant_a", "id_a", "tenant_b", "id_b"), [
    ("a:b", "c", "a", "b:c"),  # the same text once joined with ':'
    ("a", "b", "a%3A", "b"),  # a tenant that looks like another one quoted
    ("", "x", "x", ""),
])
def test_job_keys_never_name_two_jobs_alike(tenant_a, id_a, tenant_b, id_b):
    keys = {*job_keys(PREFIX, tenant_a, id_a), *job_keys(PREFIX, tenant_b, id_b)}
    assert len(keys) == 4
    # No job id names another job's events.
    assert job_keys(PREFIX, "t", "x:events")[0] != job_keys(PREFIX, "t", "x")[1]


@pytest.mark.parametrize("job_id", ["", "x" * 129, "has space", "tab\there", "new\nline",
                                    "nul\x00", "nbsp\u00a0"])
def test_bad_job_ids_are_refused(job_id):
    async def main() -> None:
        queue = JobQueue(redis.Redis(), JobQueueConfig(), consumer="a")  # never connects
        with pytest.raises(ValueError, match="job id must"):
            await queue.submit(job_id, request(), tenant="acme")
        with pytest.raises(ValueError, match="job id must"):
            await queue.get(job_id, tenant="acme")
        with pytest.raises(ValueError, match="job id must"):
            await queue.cancel(job_id, tenant="acme")
        with pytest.raises(ValueError, match="job id must"):
            await anext(queue.watch(job_id, tenant="acme", timeout_s=1))

    asyncio.run(main())


def test_take_runs_a_job_and_the_first_finish_ends_it(redis_server):
    async def main() -> None:
        async with queue_on(redis_server) as queue:
            submitted = await queue.submit("x" * 128, request(), tenant="acme")  # longest id
            claim = await take_now(queue)
            assert (claim.job_id, claim.record.state, claim.record.num_attempts) == (
                "x" * 128, RUNNING, 1)
            assert claim.record.created_ms == submitted.created_ms
            assert await queue.get("x" * 128, tenant="acme") == claim.record
            assert await queue.heartbeat(claim)
            assert await queue.take(block_ms=50) is None  # nothing else queued

            assert await queue.finish(claim, result=response()) is True
            record = await queue.get("x" * 128, tenant="acme")
            assert record is not None
            assert (record.state, record.result, record.num_attempts) == (
                SUCCEEDED, response(), 1)
            assert record.updated_ms >= claim.record.updated_ms
            job = record.to_proto()
            assert (job.job_id, job.state, job.result.text, job.num_attempts) == (
                "x" * 128, SUCCEEDED, "They guide ships.", 1)
            assert job.created_unix_ms == submitted.created_ms

            assert await queue.finish(claim, result=response("again")) is True  # a retry
            assert await queue.finish(claim, error_code=13, error="late") is True
            assert await queue.get("x" * 128, tenant="acme") == record
            assert await queue.heartbeat(claim) is False
            assert await events_of(queue, "x" * 128) == [QUEUED, RUNNING, SUCCEEDED]
            # The entry is acknowledged and gone: the queue holds only unfinished work.
            assert await queue.client.xlen(f"{PREFIX}:stream") == 0
            assert (await queue.client.xpending(f"{PREFIX}:stream", queue.config.group)
                    )["pending"] == 0

    asyncio.run(main())


def test_a_second_finish_from_another_claim_returns_false(redis_server):
    async def main() -> None:
        async with (queue_on(redis_server, consumer="a", claim_timeout_s=0.2) as a,
                    queue_on(redis_server, consumer="b", claim_timeout_s=0.2) as b):
            await a.submit("job-1", request(), tenant="acme")
            first = await take_now(a)
            await asyncio.sleep(0.3)
            second = await take_now(b)
            assert await b.finish(second, result=response("b")) is True
            assert await a.finish(first, result=response("a")) is False
            record = await a.get("job-1", tenant="acme")
            assert record is not None and record.result == response("b")

    asyncio.run(main())


def test_a_failed_job_keeps_its_error(redis_server):
    async def main() -> None:
        async with queue_on(redis_server) as queue:
            await queue.submit("job-1", request(), tenant="acme")
            claim = await take_now(queue)
            with pytest.raises(ValueError, match="non-zero"):
                await queue.finish(claim)
            with pytest.raises(ValueError, match="either succeeds"):
                await queue.finish(claim, result=response(), error_code=13)
            assert await queue.finish(claim, error_code=13, error="the worker crashed")
            record = await queue.get("job-1", tenant="acme")
            assert record is not None
            assert (record.state, record.error_code, record.error, record.result) == (
                FAILED, 13, "the worker crashed", b"")
            job = record.to_proto()
            assert (job.state, job.error_code, job.error, job.HasField("result")) == (
                FAILED, 13, "the worker crashed", False)
            assert await events_of(queue, "job-1") == [QUEUED, RUNNING, FAILED]

    asyncio.run(main())


def test_a_job_cancelled_while_queued_is_never_run(redis_server):
    async def main() -> None:
        async with queue_on(redis_server) as queue:
            await queue.submit("job-1", request(), tenant="acme")
            cancelled = await queue.cancel("job-1", tenant="acme")
            assert cancelled is not None and cancelled.state == CANCELLED
            # Ended: returned unchanged.
            assert await queue.cancel("job-1", tenant="acme") == cancelled
            assert await queue.cancel("unknown", tenant="acme") is None
            assert await queue.take(block_ms=50) is None  # skips it and drops its entry
            assert await queue.client.xlen(f"{PREFIX}:stream") == 0
            assert await queue.get("job-1", tenant="acme") == cancelled
            assert await events_of(queue, "job-1") == [QUEUED, CANCELLED]

    asyncio.run(main())


def test_a_job_cancelled_while_running_stops_its_runner(redis_server):
    async def main() -> None:
        async with queue_on(redis_server) as queue:
            await queue.submit("job-1", request(), tenant="acme")
            claim = await take_now(queue)
            cancelled = await queue.cancel("job-1", tenant="acme")
            assert cancelled is not None
            assert (cancelled.state, cancelled.num_attempts) == (CANCELLED, 1)
            assert await queue.heartbeat(claim) is False
            assert await queue.finish(claim, result=response()) is False
            assert await queue.get("job-1", tenant="acme") == cancelled
            assert await events_of(queue, "job-1") == [QUEUED, RUNNING, CANCELLED]
            assert await queue.client.xlen(f"{PREFIX}:stream") == 0  # finish acknowledged it

    asyncio.run(main())


def test_watch_from_the_start_sees_every_change(redis_server):
    async def main() -> None:
        async with queue_on(redis_server) as queue:
            await queue.submit("job-1", request(), tenant="acme")

            async def run() -> None:
                await asyncio.sleep(0.1)
                claim = await take_now(queue)
                await asyncio.sleep(0.1)
                await queue.finish(claim, result=response())

            runner = asyncio.create_task(run())
            records = await collect(queue.watch("job-1", tenant="acme", timeout_s=5))
            await runner
            assert [r.state for r in records] == [QUEUED, RUNNING, SUCCEEDED]
            assert [r.num_attempts for r in records] == [0, 1, 1]
            assert records[-1] == await queue.get("job-1", tenant="acme")
            assert records[-1].result == response()
            assert records[0].updated_ms <= records[1].updated_ms <= records[2].updated_ms

    asyncio.run(main())


def test_a_watcher_that_starts_late_misses_nothing_after_its_first_record(redis_server):
    async def main() -> None:
        async with queue_on(redis_server) as queue:
            await queue.submit("job-1", request(), tenant="acme")
            claim = await take_now(queue)
            records = queue.watch("job-1", tenant="acme", timeout_s=5)
            assert (await anext(records)).state == RUNNING
            await queue.finish(claim, result=response())  # before the watcher reads on
            rest = await collect(records)
            assert [(r.state, r.result) for r in rest] == [(SUCCEEDED, response())]

    asyncio.run(main())


def test_watch_after_the_end_gets_the_final_record_at_once(redis_server):
    async def main() -> None:
        async with queue_on(redis_server) as queue:
            await queue.submit("job-1", request(), tenant="acme")
            await queue.finish(await take_now(queue), result=response())
            t0 = time.monotonic()
            records = await collect(queue.watch("job-1", tenant="acme", timeout_s=5))
            assert time.monotonic() - t0 < 0.1
            assert records == [await queue.get("job-1", tenant="acme")]
            assert records[0].state == SUCCEEDED
            assert await collect(queue.watch("unknown", tenant="acme", timeout_s=5)) == []

    asyncio.run(main())


def test_watch_times_out_when_the_job_does_not_end(redis_server):
    async def main() -> None:
        async with queue_on(redis_server) as queue:
            await queue.submit("job-1", request(), tenant="acme")
            records = queue.watch("job-1", tenant="acme", timeout_s=0.4)
            assert (await anext(records)).state == QUEUED
            t0 = time.monotonic()
            with pytest.raises(TimeoutError, match=r"did not end within 0\.4 s"):
                await anext(records)
            assert 0.3 < time.monotonic() - t0 < 0.6

    asyncio.run(main())


def test_ended_jobs_expire_after_the_ttl_and_unended_ones_do_not(redis_server):
    async def main() -> None:
        async with queue_on(redis_server) as queue:
            for job_id in ("done", "cancelled", "running", "queued"):
                await queue.submit(job_id, request(), tenant="acme")
            done = await take_now(queue)
            running = await take_now(queue)
            assert (done.job_id, running.job_id) == ("done", "cancelled")
            await queue.finish(done, result=response())
            await queue.cancel("cancelled", tenant="acme")
            for job_id in ("done", "cancelled"):
                for key in job_keys(PREFIX, "acme", job_id):
                    assert 59_000 < await queue.client.pttl(key) <= 60_000
            await queue.cancel("queued", tenant="acme")
            await take_now(queue)  # "running" (the cancelled one's entry is dropped)
            for key in job_keys(PREFIX, "acme", "running"):
                assert await queue.client.pttl(key) == -1
            # Once expired, the id is free for a new job.
            await queue.client.delete(*job_keys(PREFIX, "acme", "done"))
            again = await queue.submit("done", request("another"), tenant="acme")
            assert (again.state, again.num_attempts) == (QUEUED, 0)
            assert await events_of(queue, "done") == [QUEUED]

    asyncio.run(main())


def test_a_dead_consumers_job_is_taken_over_and_ends_once(redis_server):
    async def main() -> None:
        async with (queue_on(redis_server, consumer="a", claim_timeout_s=0.5) as a,
                    queue_on(redis_server, consumer="b", claim_timeout_s=0.5) as b):
            await a.submit("job-1", request(), tenant="acme")
            records = a.watch("job-1", tenant="acme", timeout_s=5)
            first = await anext(records)
            watcher = asyncio.create_task(collect(records))
            lost = await take_now(a)  # then a stops heartbeating
            assert await b.take(block_ms=200) is None  # not yet: idle for < 0.5 s
            await asyncio.sleep(0.5)
            taken = await take_now(b)
            assert (taken.job_id, taken.record.state, taken.record.num_attempts) == (
                "job-1", RUNNING, 2)
            assert await a.heartbeat(lost) is False  # a comes back: the job is b's now
            assert await b.heartbeat(taken) is True
            assert await b.finish(taken, result=response("b")) is True
            assert await a.finish(lost, result=response("a")) is False
            changes = await watcher
            assert [(r.state, r.num_attempts) for r in [first, *changes]] == [
                (QUEUED, 0), (RUNNING, 1), (RUNNING, 2), (SUCCEEDED, 2)]
            assert changes[-1].result == response("b")
            assert await events_of(a, "job-1") == [QUEUED, RUNNING, RUNNING, SUCCEEDED]
            assert await a.take(block_ms=50) is None and await b.take(block_ms=50) is None

    asyncio.run(main())


def test_a_presumed_dead_consumer_that_finishes_first_wins(redis_server):
    async def main() -> None:
        async with (queue_on(redis_server, consumer="a", claim_timeout_s=0.2) as a,
                    queue_on(redis_server, consumer="b", claim_timeout_s=0.2) as b):
            await a.submit("job-1", request(), tenant="acme")
            slow = await take_now(a)
            await asyncio.sleep(0.3)
            taken = await take_now(b)
            assert await a.finish(slow, result=response("a")) is True
            assert await b.heartbeat(taken) is False
            assert await b.finish(taken, result=response("b")) is False
            record = await a.get("job-1", tenant="acme")
            assert record is not None
            assert (record.state, record.result, record.num_attempts) == (
                SUCCEEDED, response("a"), 2)
            assert (await events_of(a, "job-1")).count(SUCCEEDED) == 1

    asyncio.run(main())


def test_a_heartbeating_consumer_keeps_its_job(redis_server):
    async def main() -> None:
        async with (queue_on(redis_server, consumer="a", claim_timeout_s=0.3) as a,
                    queue_on(redis_server, consumer="b", claim_timeout_s=0.3) as b):
            await a.submit("job-1", request(), tenant="acme")
            claim = await take_now(a)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.0:
                assert await a.heartbeat(claim)
                assert await b.take(block_ms=100) is None
            assert await a.finish(claim, result=response()) is True
            record = await a.get("job-1", tenant="acme")
            assert record is not None and record.num_attempts == 1

    asyncio.run(main())


def test_an_entry_left_by_an_expired_job_does_not_run_its_successor_twice(redis_server):
    async def main() -> None:
        async with queue_on(redis_server) as queue:
            await queue.submit("job-1", request("old"), tenant="acme")
            # Its queue entry stays until a consumer reads it.
            await queue.cancel("job-1", tenant="acme")
            await queue.client.delete(*job_keys(PREFIX, "acme", "job-1"))
            # The id is free again.
            await queue.submit("job-1", request("new"), tenant="acme")
            claim = await take_now(queue)  # the old entry is dropped, the new one runs
            assert (claim.record.request, claim.record.num_attempts) == (request("new"), 1)
            assert await queue.take(block_ms=50) is None
            assert await queue.finish(claim, result=response())

    asyncio.run(main())


def test_a_cancelled_caller_stops_even_if_the_redis_client_swallows_the_cancellation():
    async def hgetall_swallowing_cancellation(key: str) -> dict:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:  # what asyncio.wait_for may do on Python 3.11
            return {}
        return {}

    async def main() -> None:
        client = redis.Redis()  # never connects
        client.hgetall = hgetall_swallowing_cancellation  # type: ignore[method-assign]
        queue = JobQueue(client, JobQueueConfig(), consumer="a")
        reading = asyncio.create_task(queue.get("job-1", tenant="acme"))
        await asyncio.sleep(0.01)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading

    asyncio.run(main())


def test_chaos_consumers_killed_at_random_every_job_ends_exactly_once(redis_server):
    num_jobs, num_consumers = 100, 4
    rng = random.Random(1234)
    job_ids = [f"job-{i:03d}" for i in range(num_jobs)]
    won: list[str] = []  # the job of every finish() that returned True
    finishing: set[asyncio.Task] = set()

    async def consume(queue: JobQueue) -> None:
        while True:
            claim = await queue.take(block_ms=50)
            if claim is None:
                continue
            work_s, is_mine = rng.uniform(0, 0.06), True
            while work_s > 0 and is_mine:
                await asyncio.sleep(min(work_s, 0.02))
                work_s -= 0.02
                is_mine = await queue.heartbeat(claim)
            if is_mine:
                # A kill may land while the finish is in flight: the finish runs on, as
                # in a process that dies right after its reply, so its answer is counted.
                finish = asyncio.create_task(finish_and_count(queue, claim))
                finishing.add(finish)
                await asyncio.shield(finish)

    async def finish_and_count(queue: JobQueue, claim: Claim) -> None:
        if await queue.finish(claim, result=response(claim.job_id)):
            won.append(claim.job_id)

    async def main() -> None:
        async with client_on(redis_server) as client:
            config = JobQueueConfig(claim_timeout_s=0.3, result_ttl_s=60)

            def start(name: str) -> asyncio.Task:
                return asyncio.create_task(consume(JobQueue(client, config, consumer=name)))

            producer = JobQueue(client, config, consumer="producer")
            for job_id in job_ids:
                await producer.submit(job_id, request(job_id), tenant="acme")
            consumers = {f"c{i}": start(f"c{i}") for i in range(num_consumers)}
            killed: list[asyncio.Task] = []
            deadline = time.monotonic() + 20
            while len(won) < num_jobs:
                assert time.monotonic() < deadline, f"only {len(won)} jobs ended"
                await asyncio.sleep(rng.uniform(0.03, 0.12))
                victim = consumers.pop(rng.choice(sorted(consumers)))
                victim.cancel()
                killed.append(victim)
                name = f"c{num_consumers + len(killed)}"
                consumers[name] = start(name)
            for task in consumers.values():
                task.cancel()
            # Killed means dead: no consumer goes on taking jobs after its cancellation.
            _, alive = await asyncio.wait([*killed, *consumers.values(), *finishing],
                                          timeout=5)
            assert not alive

            assert sorted(won) == job_ids  # exactly one True per job
            records = [await producer.get(job_id, tenant="acme") for job_id in job_ids]
            assert all(r is not None and r.state == SUCCEEDED for r in records)
            assert all(r is not None and r.result == response(r.job_id) for r in records)
            for job_id in job_ids:
                states = await events_of(producer, job_id)
                assert [s for s in states if s in TERMINAL] == [SUCCEEDED], job_id
                assert states[-1] == SUCCEEDED
            assert len(killed) >= 5
            assert any(r is not None and r.num_attempts > 1 for r in records)  # takeovers ran
            assert await client.xlen(f"{PREFIX}:stream") == 0

    asyncio.run(main())


def test_redis_killed_every_call_fails_fast_with_unavailable(redis_server):
    async def main() -> None:
        async with queue_on(redis_server) as queue:
            await queue.submit("job-1", request(), tenant="acme")
            claim = await take_now(queue)
            redis_server.kill()
            calls = [queue.submit("job-2", request(), tenant="acme"),
                     queue.get("job-1", tenant="acme"), queue.cancel("job-1", tenant="acme"),
                     queue.take(block_ms=1000), queue.heartbeat(claim),
                     queue.finish(claim, result=response()),
                     anext(queue.watch("job-1", tenant="acme", timeout_s=5))]
            for call in calls:
                t0 = time.monotonic()
                with pytest.raises(JobStoreUnavailable, match="the job store failed while"):
                    await call
                assert time.monotonic() - t0 < 2 * TIMEOUT_S + 0.1

    asyncio.run(main())


def test_a_hung_redis_fails_within_the_timeout_and_a_watcher_does_not_hang(redis_server):
    async def main() -> None:
        async with queue_on(redis_server) as queue:
            await queue.submit("job-1", request(), tenant="acme")
            records = queue.watch("job-1", tenant="acme", timeout_s=30)
            assert (await anext(records)).state == QUEUED  # now blocked reading events
            redis_server.pause()
            try:
                t0 = time.monotonic()
                with pytest.raises(JobStoreUnavailable):
                    await anext(records)
                with pytest.raises(JobStoreUnavailable, match="while reading a job"):
                    await queue.get("job-1", tenant="acme")
                with pytest.raises(JobStoreUnavailable):
                    await queue.take(block_ms=100)
                assert time.monotonic() - t0 < 3 * (2 * TIMEOUT_S + 0.15)
            finally:
                redis_server.resume()
            record = await queue.get("job-1", tenant="acme")
            assert record is not None and record.state == QUEUED

    asyncio.run(main())


def test_the_queue_recovers_after_redis_restarts_empty(redis_server):
    async def main() -> None:
        async with queue_on(redis_server) as queue:
            await queue.submit("job-1", request(), tenant="acme")
            assert await queue.take(block_ms=50) is not None  # the group exists now
            redis_server.kill()
            with pytest.raises(JobStoreUnavailable):
                await queue.take(block_ms=50)
            redis_server.start()  # same port, empty: no jobs, no group, no scripts
            assert await queue.get("job-1", tenant="acme") is None
            await queue.submit("job-2", request(), tenant="acme")
            claim = await take_now(queue)  # makes the group again
            assert (claim.job_id, claim.record.num_attempts) == ("job-2", 1)
            assert await queue.finish(claim, result=response())

    asyncio.run(main())
