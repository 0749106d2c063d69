"""Async jobs and a Redis outage end to end, on a mesh of this module's own (its Redis
and frontends get killed): Envoy, Redis, tokenizer, safety, cache, one worker, the
mesh's frontend and two more frontends that a test kills at random moments."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis

from genmesh.client import Client, GenmeshError, Job
from genmesh.core import metadata
from genmesh.launcher.plan import DEPLOYMENT_FILE, PORT_FIELDS, MeshConfig
from genmesh.launcher.ports import free_ports
from genmesh.launcher.probes import RedisPing
from genmesh.launcher.supervisor import Supervisor
from genmesh.security import clients, pki
from genmesh.v1 import (
    cache_pb2,
    cache_pb2_grpc,
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
)
from services.frontend.jobs import JobQueueConfig, job_keys
from tests.conftest import DEFAULT_MODEL, OTHER_API_KEY, mesh_deployment
from tests.procs import REPO_ROOT, free_port, launched, wait_serving

CLAIM_TIMEOUT_S = 2.0
ENDED = {generation_pb2.JOB_STATE_SUCCEEDED, generation_pb2.JOB_STATE_FAILED,
         generation_pb2.JOB_STATE_CANCELLED}


@dataclass
class JobsMesh:
    config: MeshConfig
    supervisor: Supervisor
    extra: list[subprocess.Popen] = field(default_factory=list)

    @property
    def edge(self) -> str:
        return self.config.edge_address

    def client(self, **kwargs: object) -> Client:
        return Client(self.edge, timeout_s=120, **kwargs)  # type: ignore[arg-type]

    @property
    def secrets(self) -> pki.Secrets:
        return pki.Secrets(self.config.secrets_dir)

    def as_envoy(self, address: str, peer: str = "frontend") -> grpc.Channel:
        """A channel to a service's own port as Envoy, the only caller it admits."""
        return clients.channel(address, self.secrets, identity=pki.GATEWAY, peer=peer)

    def start_frontend(self, port: int, log: Path) -> subprocess.Popen:
        """One more frontend of the mesh (not behind Envoy's edge: called directly)."""
        mesh = self.config.mesh_address
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.frontend.main", "--port", str(port),
                 "--tokenizer-address", mesh, "--worker-address", mesh,
                 "--safety-address", mesh, "--cache-address", mesh,
                 "--deployment-file", str(self.config.run_dir / DEPLOYMENT_FILE),
                 "--secrets-dir", str(self.config.secrets_dir)],
                cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
        wait_serving(f"127.0.0.1:{port}", proc=proc,
                     channel=self.as_envoy(f"127.0.0.1:{port}"))
        self.extra.append(proc)
        return proc


@pytest.fixture(scope="module")
def jobs_mesh(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobsMesh]:
    run_dir = tmp_path_factory.mktemp("jobs-mesh")
    ports = dict(zip(PORT_FIELDS, free_ports(len(PORT_FIELDS)), strict=True))
    config = MeshConfig(**ports, model=DEFAULT_MODEL, versions=("v1",), kv_cache_gib=0.25,
                        run_dir=run_dir, safety_embedding=False, with_prometheus=False,
                        deployment=mesh_deployment(run_dir / "source.yaml", budgets=False,
                                                   job_claim_timeout_s=CLAIM_TIMEOUT_S))
    with launched(config) as supervisor:
        mesh = JobsMesh(config, supervisor)
        try:
            yield mesh
        finally:
            for proc in mesh.extra:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)


def test_a_job_runs_to_its_result_and_is_watched_to_the_end(jobs_mesh):
    with jobs_mesh.client() as client:
        job = client.submit_job("Count to 3.", max_tokens=6)
        assert job.state in ("queued", "running") and job.job_id
        states = [j.state for j in client.watch_job(job.job_id)]
        assert states[-1] == "succeeded" and set(states) <= {"queued", "running", "succeeded"}
        done = client.get_job(job.job_id)
        assert done.result is not None and done.result.text and done.num_attempts == 1
        assert done.result.usage.completion_tokens > 0


def test_job_ids_are_idempotent_and_private_to_their_tenant(jobs_mesh):
    job_id = f"mine-{uuid.uuid4().hex[:8]}"
    with jobs_mesh.client() as client:
        first = client.submit_job("Count to 2.", job_id=job_id, max_tokens=4)
        again = client.submit_job("Count to 2.", job_id=job_id, max_tokens=4)
        assert again.job_id == first.job_id == job_id
        assert again.created_unix_ms == first.created_unix_ms  # the same job, not a new one
        with pytest.raises(GenmeshError) as conflict:
            client.submit_job("Something else.", job_id=job_id, max_tokens=4)
        assert conflict.value.code == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(GenmeshError) as bad:
            client.submit_job("x", job_id="has spaces")
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(GenmeshError) as bad_request:
            client.submit_job("x", max_tokens=4, model="no-such-model")
        assert bad_request.value.code == grpc.StatusCode.NOT_FOUND
    with jobs_mesh.client(api_key=OTHER_API_KEY) as other:
        for call in (other.get_job, other.cancel_job, lambda j: list(other.watch_job(j))):
            with pytest.raises(GenmeshError) as hidden:
                call(job_id)
            assert hidden.value.code == grpc.StatusCode.NOT_FOUND
            assert "unknown, or expired" in hidden.value.message
        # The id is the other tenant's own too: a new job, not ALREADY_EXISTS.
        theirs = other.submit_job("Something else.", job_id=job_id, max_tokens=4)
        assert (theirs.job_id, theirs.state) == (job_id, "queued")
        assert other.cancel_job(job_id).state == "cancelled"
    with jobs_mesh.client() as client:
        mine = client.get_job(job_id)  # untouched by the other tenant's cancel
        assert mine.created_unix_ms == first.created_unix_ms and mine.state != "cancelled"


def test_a_cancelled_job_stays_cancelled(jobs_mesh):
    with jobs_mesh.client() as client:
        job = client.submit_job("Write a long story about a dragon.", max_tokens=400,
                                ignore_eos=True)
        cancelled = client.cancel_job(job.job_id)
        assert cancelled.state == "cancelled"
        time.sleep(1.0)
        assert client.get_job(job.job_id).state == "cancelled"
        assert client.cancel_job(job.job_id).state == "cancelled"  # ended: unchanged


def job_stub(mesh: JobsMesh, address: str
             ) -> tuple[grpc.Channel, generation_pb2_grpc.GenerationStub]:
    channel = mesh.as_envoy(address)
    return channel, generation_pb2_grpc.GenerationStub(channel)


MIN_KILLS = 3


def test_50_jobs_finish_once_while_frontends_are_killed_at_random(jobs_mesh, tmp_path):
    rng = random.Random(7)
    ports = [free_port(), free_port()]
    procs = {p: jobs_mesh.start_frontend(p, tmp_path / f"frontend-{p}.log") for p in ports}
    tenant = ((metadata.TENANT, "dev"),)  # what Envoy would set: these are called directly
    job_ids = [f"chaos-{uuid.uuid4().hex[:6]}-{i}" for i in range(50)]
    for i, job_id in enumerate(job_ids):
        channel, stub = job_stub(jobs_mesh, f"127.0.0.1:{ports[i % 2]}")
        with channel:
            stub.SubmitJob(generation_pb2.SubmitJobRequest(
                job_id=job_id, request=generation_pb2.GenerateRequest(
                    prompt=f"Say the number {i} in words.", skip_cache=True,
                    params=common_pb2.SamplingParams(max_tokens=16, ignore_eos=True))),
                timeout=10, metadata=tenant)
    num_kills = 0
    deadline = time.monotonic() + 240
    states: dict[str, Job] = {}
    # Polled on the mesh's own frontend, directly: 50 calls a round would exceed the
    # tenant's rate limit at the edge.
    frontend = f"{jobs_mesh.config.host}:{jobs_mesh.config.frontend_port}"
    as_envoy = {"credentials": clients.credentials(jobs_mesh.secrets, identity=pki.GATEWAY,
                                                   peer="frontend"),
                "options": tuple(clients.options("frontend"))}
    with Client(frontend, timeout_s=30, metadata=tenant, **as_envoy) as client:
        while time.monotonic() < deadline:
            if num_kills < MIN_KILLS:
                # A frontend dies mid-work, and comes back a moment later.
                port = rng.choice(ports)
                procs[port].send_signal(signal.SIGKILL)
                procs[port].wait(timeout=10)
                num_kills += 1
                time.sleep(rng.uniform(0.1, 0.6))
                procs[port] = jobs_mesh.start_frontend(port, tmp_path / f"frontend-{port}.log")
            # Then the rest is taken over and run to the end (on a slow machine, killing
            # on and on let a frontend barely start between kills: 112 s on two cores).
            time.sleep(rng.uniform(0.1, 0.6))
            states = {j: client.get_job(j) for j in job_ids}
            # Exactly MIN_KILLS kills: on a quick day the jobs can all end after two, and
            # a kill after they ended still checks that none is run again.
            if num_kills >= MIN_KILLS and all(s.has_ended for s in states.values()):
                break
    ended = [s for s in states.values() if s.has_ended]
    attempts = sorted(s.num_attempts for s in states.values())
    print(f"jobs: {len(ended)} of {len(job_ids)} ended after {num_kills} kills; "
          f"{sum(a > 1 for a in attempts)} were taken over (attempts: max {attempts[-1]})")
    assert len(ended) == len(job_ids), "some jobs were lost"
    assert all(s.state == "succeeded" for s in states.values())
    # Once: every job's event log has exactly one terminal event.
    r = redis.Redis.from_url(pki.login(jobs_mesh.config.redis_url, jobs_mesh.secrets,
                                       pki.OPERATOR))
    try:
        for job_id in job_ids:
            events = r.xrange(job_keys(JobQueueConfig().prefix, "dev", job_id)[1])
            terminal = [e for _, e in events if int(e[b"state"]) in ENDED]
            assert len(terminal) == 1, (job_id, events)
    finally:
        r.close()
    assert num_kills >= MIN_KILLS and any(a > 1 for a in attempts)


def cache_errors(mesh: JobsMesh) -> int:
    address = f"{mesh.config.host}:{mesh.config.cache_port}"
    with mesh.as_envoy(address, peer="cache") as ch:
        return cache_pb2_grpc.CacheStub(ch).GetStats(cache_pb2.CacheStatsRequest(),
                                                     timeout=5).num_store_errors


def test_requests_succeed_while_redis_is_down_and_the_cache_recovers(jobs_mesh):
    prompt = f"Name a planet. ({uuid.uuid4().hex[:6]})"
    with jobs_mesh.client() as client:
        client.generate(prompt, max_tokens=6)
        assert client.generate(prompt, max_tokens=6).usage.response_cached
        redis_proc = jobs_mesh.supervisor.procs["redis"]
        redis_proc.kill()
        redis_proc.wait(timeout=10)
        errors_before = cache_errors(jobs_mesh)
        try:
            for _ in range(3):
                t0 = time.monotonic()
                answer = client.generate(prompt, max_tokens=6)
                assert answer.text and not answer.usage.response_cached
                assert time.monotonic() - t0 < 5  # the cache is skipped, not waited for
            assert cache_errors(jobs_mesh) > errors_before  # counted
        finally:
            spec = next(s for s in jobs_mesh.supervisor.specs if s.name == "redis")
            jobs_mesh.supervisor.procs["redis"] = subprocess.Popen(
                spec.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ping = RedisPing(jobs_mesh.config.host, jobs_mesh.config.redis_port)
            deadline = time.monotonic() + 10
            while not ping() and time.monotonic() < deadline:
                time.sleep(0.05)
        # Back (empty): the first answer is stored again, the second replayed.
        assert not client.generate(prompt, max_tokens=6).usage.response_cached
        assert client.generate(prompt, max_tokens=6).usage.response_cached
