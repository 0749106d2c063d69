"""The job rpcs of the Generation servicer against a real redis-server, with two tenants:
job ids are each tenant's own, so the same id in two tenants is two jobs, each run by the
runner as its tenant's, and no rpc of one tenant sees, blocks or touches the other's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
import redis.asyncio as redis

from genmesh.core import metadata
from genmesh.v1 import common_pb2, generation_pb2
from services.frontend.admission import Admission, AdmissionPolicy
from services.frontend.events import Event, Finished, Started, TextChunk
from services.frontend.job_runner import JobRunner
from services.frontend.jobs import JobQueue, JobQueueConfig
from services.frontend.limits import DEFAULT_LIMITS
from services.frontend.pipeline import PipelineRequest
from services.frontend.servicer import GenerationServicer
from tests.procs import RedisServer

JOB_ID = "report-X"
QUEUED, SUCCEEDED = generation_pb2.JOB_STATE_QUEUED, generation_pb2.JOB_STATE_SUCCEEDED
CANCELLED = generation_pb2.JOB_STATE_CANCELLED


class Aborted(Exception):
    """What grpc's abort raises, in these tests."""


class Context:
    """A call from ``tenant``, as Envoy stamps it."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.status: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((metadata.TENANT, self.tenant),)

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise Aborted


class EchoPipeline:
    """Answers "<tenant>: <prompt>", so a result shows whose job made it."""

    limits = DEFAULT_LIMITS  # what SubmitJob refuses before it queues a job

    def __init__(self) -> None:
        self.tenants: list[str] = []

    async def run(self, req: PipelineRequest, *, timeout_s: float
                  ) -> AsyncGenerator[Event, None]:
        self.tenants.append(req.tenant)
        yield Started(req.request_id, req.model, "v1", 3)
        yield TextChunk(f"{req.tenant}: {req.prompt}")
        yield Finished(common_pb2.FINISH_REASON_STOP,
                       common_pb2.Usage(prompt_tokens=3, completion_tokens=2))


class Catalog:
    def resolve(self, model: str, version: str) -> tuple[str, str]:
        return model or "m", version


def submit(prompt: str, job_id: str = JOB_ID) -> generation_pb2.SubmitJobRequest:
    return generation_pb2.SubmitJobRequest(
        job_id=job_id, request=generation_pb2.GenerateRequest(prompt=prompt))


def ref(job_id: str = JOB_ID) -> generation_pb2.JobRef:
    return generation_pb2.JobRef(job_id=job_id)


@asynccontextmanager
async def servicer_on(server: RedisServer) -> AsyncIterator[tuple[GenerationServicer,
                                                                  JobQueue]]:
    client = redis.Redis.from_url(server.url, socket_timeout=2.0)
    queue = JobQueue(client, JobQueueConfig(claim_timeout_s=5), consumer="frontend-a")
    servicer = GenerationServicer(
        pipeline=EchoPipeline(), catalog=Catalog(),  # type: ignore[arg-type]
        max_generation_s=5, max_session_turns=4, jobs=queue,
        admission=Admission(AdmissionPolicy(tenants={"acme": None, "globex": None}), None))
    try:
        yield servicer, queue
    finally:
        await client.aclose()


async def status_of_call(handler: object, request: object, tenant: str
                         ) -> tuple[grpc.StatusCode, str]:
    """The status a unary call, or a streaming call's first read, aborted with."""
    context = Context(tenant)
    with pytest.raises(Aborted):
        reply = handler(request, context)  # type: ignore[operator]
        if hasattr(reply, "__anext__"):
            await anext(reply)
        else:
            await reply
    assert context.status is not None
    return context.status


async def watch(servicer: GenerationServicer, tenant: str) -> list[generation_pb2.Job]:
    return [job async for job in servicer.WatchJob(ref(), Context(tenant))]


def test_the_same_job_id_in_two_tenants_is_two_jobs_with_their_own_results(redis_server):
    async def main() -> None:
        async with servicer_on(redis_server) as (servicer, queue):
            acme = await servicer.SubmitJob(submit("Count to 3."), Context("acme"))
            # globex's id is its own: no ALREADY_EXISTS, and not acme's job either.
            globex = await servicer.SubmitJob(submit("Name a planet."), Context("globex"))
            assert (acme.job_id, acme.state, globex.job_id, globex.state) == (
                JOB_ID, QUEUED, JOB_ID, QUEUED)
            runner = JobRunner(queue, pipeline=servicer.pipeline, catalog=servicer.catalog,
                               max_running=2, claim_timeout_s=5, timeout_s=5)
            running = asyncio.ensure_future(runner.run())
            try:
                ends = await asyncio.wait_for(asyncio.gather(
                    watch(servicer, "acme"), watch(servicer, "globex")), timeout=10)
            finally:
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
            results = {}
            for tenant, jobs in zip(("acme", "globex"), ends, strict=True):
                assert jobs[-1].state == SUCCEEDED and jobs[-1].num_attempts == 1
                results[tenant] = jobs[-1].result.text
                got = await servicer.GetJob(ref(), Context(tenant))
                assert got == jobs[-1]
            assert results == {"acme": "acme: Count to 3.", "globex": "globex: Name a planet."}
            pipeline = servicer.pipeline
            assert isinstance(pipeline, EchoPipeline)
            assert sorted(pipeline.tenants) == ["acme", "globex"]  # one run each

    asyncio.run(main())


def test_no_job_rpc_of_one_tenant_sees_or_touches_anothers_job(redis_server):
    async def main() -> None:
        async with servicer_on(redis_server) as (servicer, _):
            acme = await servicer.SubmitJob(submit("Count to 3."), Context("acme"))
            not_found = grpc.StatusCode.NOT_FOUND
            for handler in (servicer.GetJob, servicer.WatchJob, servicer.CancelJob):
                code, message = await status_of_call(handler, ref(), "globex")
                assert (code, message) == (
                    not_found, "you have no job 'report-X' (unknown, or expired)")
                # The same answer as for an id nobody used: nothing tells them apart.
                assert await status_of_call(handler, ref("never-used"), "globex") == (
                    not_found, "you have no job 'never-used' (unknown, or expired)")
            assert await servicer.GetJob(ref(), Context("acme")) == acme  # not cancelled

            # globex takes the id for its own job; cancelling it leaves acme's alone.
            globex = await servicer.SubmitJob(submit("Name a planet."), Context("globex"))
            assert globex.created_unix_ms >= acme.created_unix_ms
            cancelled = await servicer.CancelJob(ref(), Context("globex"))
            assert cancelled.state == CANCELLED
            assert await servicer.GetJob(ref(), Context("acme")) == acme
            assert [job.state for job in await watch(servicer, "globex")] == [CANCELLED]

    asyncio.run(main())


def test_a_resubmission_within_a_tenant_is_idempotent_and_a_different_one_conflicts(
        redis_server):
    async def main() -> None:
        async with servicer_on(redis_server) as (servicer, queue):
            first = await servicer.SubmitJob(submit("Count to 3."), Context("acme"))
            again = await servicer.SubmitJob(submit("Count to 3."), Context("acme"))
            assert again == first
            code, message = await status_of_call(servicer.SubmitJob, submit("Other."), "acme")
            assert code == grpc.StatusCode.ALREADY_EXISTS
            assert "'report-X' is already used by a different request" in message
            # Another tenant's identical submission is a new job, not acme's.
            theirs = await servicer.SubmitJob(submit("Count to 3."), Context("globex"))
            assert (theirs.job_id, theirs.state) == (JOB_ID, QUEUED)
            assert await queue.client.xlen(f"{queue.config.prefix}:stream") == 2  # two jobs
            await servicer.CancelJob(ref(), Context("globex"))
            assert await servicer.GetJob(ref(), Context("acme")) == first

    asyncio.run(main())
