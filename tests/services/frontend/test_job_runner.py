"""The job runner against a real redis-server, with a scripted pipeline: a job that
fails because a service was down runs again (after its claim times out) instead of
failing for good, up to its attempts; other failures are final at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

import grpc
import redis.asyncio as redis

from genmesh.v1 import common_pb2, generation_pb2
from services.frontend.errors import PipelineError
from services.frontend.events import Event, Finished, Started, TextChunk
from services.frontend.job_runner import JobRunner
from services.frontend.jobs import JobQueue, JobQueueConfig, JobRecord, JobState
from services.frontend.pipeline import PipelineRequest
from tests.procs import RedisServer

CLAIM_TIMEOUT_S = 0.4


class ScriptedPipeline:
    """Fails with the next code of ``failures`` on each run, then answers "ok"."""

    def __init__(self, failures: list[grpc.StatusCode]) -> None:
        self.failures = failures
        self.num_runs = 0

    async def run(self, req: PipelineRequest, *, timeout_s: float
                  ) -> AsyncGenerator[Event, None]:
        self.num_runs += 1
        if self.failures:
            raise PipelineError(self.failures.pop(0), "the worker is unavailable")
        yield Started(req.request_id, req.model, "v1", 3)
        yield TextChunk("ok")
        yield Finished(common_pb2.FINISH_REASON_STOP,
                       common_pb2.Usage(prompt_tokens=3, completion_tokens=1))


class Catalog:
    def resolve(self, model: str, version: str) -> tuple[str, str]:
        return model or "m", version


def run_job(redis_server: RedisServer, failures: list[grpc.StatusCode]
            ) -> tuple[JobRecord, int]:
    async def run() -> tuple[JobRecord, int]:
        client = redis.Redis.from_url(redis_server.url, socket_timeout=2.0)
        queue = JobQueue(client, JobQueueConfig(claim_timeout_s=CLAIM_TIMEOUT_S),
                         consumer="runner-1")
        pipeline = ScriptedPipeline(failures)
        runner = JobRunner(queue, pipeline=pipeline, catalog=Catalog(),  # type: ignore[arg-type]
                           max_running=1, claim_timeout_s=CLAIM_TIMEOUT_S, timeout_s=5)
        request = generation_pb2.GenerateRequest(prompt="hi").SerializeToString()
        await queue.submit("job-1", request, tenant="acme")
        task = asyncio.ensure_future(runner.run())
        deadline = time.monotonic() + 20
        try:
            while True:
                record = await queue.get("job-1", tenant="acme")
                assert record is not None
                if record.state in (JobState.JOB_STATE_SUCCEEDED, JobState.JOB_STATE_FAILED):
                    return record, pipeline.num_runs
                assert time.monotonic() < deadline, record
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.aclose()

    return asyncio.run(run())


def test_a_job_that_met_a_service_down_runs_again_and_succeeds(redis_server):
    record, num_runs = run_job(redis_server, [grpc.StatusCode.UNAVAILABLE])
    assert record.state == JobState.JOB_STATE_SUCCEEDED
    assert (record.num_attempts, num_runs) == (2, 2)
    assert generation_pb2.GenerateResponse.FromString(record.result).text == "ok"


def test_a_bad_request_fails_at_once(redis_server):
    record, num_runs = run_job(redis_server, [grpc.StatusCode.INVALID_ARGUMENT])
    assert record.state == JobState.JOB_STATE_FAILED
    assert (record.num_attempts, num_runs) == (1, 1)
    assert record.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_a_service_down_for_every_attempt_fails_the_job_at_the_last(redis_server):
    record, num_runs = run_job(redis_server, [grpc.StatusCode.UNAVAILABLE] * 5)
    assert record.state == JobState.JOB_STATE_FAILED
    assert (record.num_attempts, num_runs) == (3, 3)
    assert record.error_code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "unavailable" in record.error
