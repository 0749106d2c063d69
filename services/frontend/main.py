"""Entry point: ``python -m services.frontend.main [--flags]`` (or GENMESH_FRONTEND_* env)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis.asyncio as aioredis

from genmesh.authz.v3 import external_auth_pb2 as authz_pb2
from genmesh.authz.v3 import external_auth_pb2_grpc as authz_grpc
from genmesh.core import deployment
from genmesh.core.failure import FailureMode
from genmesh.core.models.store import default_store_root
from genmesh.v1 import (
    cache_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    safety_pb2_grpc,
    tokenizer_pb2_grpc,
    worker_pb2_grpc,
)
from services.common.server import run_service, serve
from services.common.telemetry import settings_from, setup
from services.common.tls import MeshTls
from services.common.tls import redis_url as redis_login
from services.frontend import budget
from services.frontend.admission import Admission, AdmissionPolicy
from services.frontend.auth import AuthorizationServicer, KeyRing
from services.frontend.catalog import ModelCatalog
from services.frontend.config import FrontendConfig
from services.frontend.detokenize import choose
from services.frontend.job_runner import JobRunner
from services.frontend.jobs import JobQueue, JobQueueConfig
from services.frontend.limits import RequestLimits
from services.frontend.moderation import SafetyGate, SafetySettings
from services.frontend.pipeline import build_pipeline
from services.frontend.response_cache import CacheSettings, ResponseCache
from services.frontend.routing import Affinity
from services.frontend.servicer import GenerationServicer


@dataclass(frozen=True, slots=True)
class Served:
    """What this frontend serves, from the deployment file or else the config."""

    model: str
    versions: tuple[str, ...]
    admission: AdmissionPolicy
    affinity: Affinity
    redis_url: str | None
    budget_failure_mode: FailureMode
    safety: SafetySettings | None = None  # None: no safety service in the deployment
    cache: CacheSettings | None = None  # None: no response cache in the deployment
    jobs: JobQueueConfig = field(default_factory=JobQueueConfig)  # used with a redis_url
    max_running_jobs: int = 4
    max_batch_inflight: int = 8
    limits: RequestLimits = field(default_factory=RequestLimits)  # the size of a request
    # The tenants' API keys, for the edge's ext_authz Check (auth.py); empty: no tenants.
    keys: KeyRing = field(default_factory=lambda: KeyRing(()))


JOBS_SOCKET_TIMEOUT_S = 2.0


def served(cfg: FrontendConfig) -> Served:
    if not cfg.deployment_file:
        return Served(cfg.model, cfg.versions, AdmissionPolicy(tenants={}), Affinity(), None,
                      FailureMode.CLOSED)
    dep = deployment.load(Path(cfg.deployment_file))
    return Served(
        model=dep.model, versions=tuple(v.name for v in dep.versions),
        admission=AdmissionPolicy(tenants={t.name: t.tokens_per_minute for t in dep.tenants},
                                  api_key_header=dep.limits.api_key_header),
        affinity=Affinity(block_size=dep.kv_block_size, max_blocks=dep.prefix_affinity_blocks),
        redis_url=dep.redis_url,
        budget_failure_mode=dep.limits.budget_failure_mode,
        safety=None if not dep.services.safety else SafetySettings(
            timeout_s=dep.limits.safety_timeout_s,
            prompt_failure_mode=dep.limits.safety_prompt_failure_mode,
            output_failure_mode=dep.limits.safety_output_failure_mode,
            moderation_mode=cfg.moderation, window_s=cfg.moderation_window_ms / 1000,
            window_chars=cfg.moderation_window_chars,
            max_in_flight=cfg.moderation_max_in_flight),
        cache=None if not dep.services.cache else CacheSettings(
            timeout_s=dep.limits.cache_timeout_s, ttl_s=dep.limits.cache_ttl_s),
        jobs=JobQueueConfig(claim_timeout_s=dep.limits.job_claim_timeout_s,
                            result_ttl_s=dep.limits.job_result_ttl_s),
        max_running_jobs=dep.limits.max_running_jobs,
        max_batch_inflight=dep.limits.max_batch_inflight,
        limits=RequestLimits(max_chat_messages=dep.limits.max_chat_messages,
                             max_prompt_chars=dep.limits.max_prompt_chars),
        keys=KeyRing.of({t.name: t.api_keys for t in dep.tenants}))


async def run(cfg: FrontendConfig) -> None:
    telemetry = setup(settings_from("genmesh-frontend", cfg))
    what = served(cfg)
    tls = MeshTls.of(cfg)
    redis_url = None if what.redis_url is None else redis_login(cfg, what.redis_url)
    tokenizer_channel = telemetry.channel(cfg.tokenizer_address, tls)
    worker_channel = telemetry.channel(cfg.worker_address, tls)
    tokenizer = tokenizer_pb2_grpc.TokenizerStub(tokenizer_channel)
    worker = worker_pb2_grpc.WorkerStub(worker_channel)
    redis = (None if redis_url is None
             else budget.redis_client(redis_url, timeout_s=cfg.redis_timeout_s))
    budgets = (None if redis is None else budget.TokenBudgets(
        redis, timeout_s=cfg.redis_timeout_s, failure_mode=what.budget_failure_mode))
    admission = Admission(what.admission, budgets)
    safety_channel = (None if what.safety is None
                      else telemetry.channel(cfg.safety_address, tls))
    safety = (None if safety_channel is None or what.safety is None
              else SafetyGate(safety_pb2_grpc.SafetyStub(safety_channel), what.safety))
    cache_channel = (None if what.cache is None
                     else telemetry.channel(cfg.cache_address, tls))
    cache = (None if cache_channel is None or what.cache is None
             else ResponseCache(cache_pb2_grpc.CacheStub(cache_channel), what.cache))
    detokenizers = choose(cfg.detokenize, store_root=Path(cfg.model_store)
                          if cfg.model_store else default_store_root(), models=[what.model],
                          stub=tokenizer)
    # The chain of stages, chosen once: what the deployment lacks, the chain lacks.
    pipeline = build_pipeline(tokenizer=tokenizer, worker=worker,
                              rpc_timeout_s=cfg.rpc_timeout_s, detokenizers=detokenizers,
                              admission=admission, affinity=what.affinity, safety=safety,
                              cache=cache, limits=what.limits, versions=what.versions)
    catalog = ModelCatalog(model=what.model, versions=what.versions, tokenizer=tokenizer,
                           worker=worker, rpc_timeout_s=cfg.rpc_timeout_s)
    # Jobs get a client of their own: their reads block up to a second, longer than the
    # budget client's timeout allows.
    jobs_client = (None if redis_url is None else aioredis.Redis.from_url(
        redis_url, socket_timeout=JOBS_SOCKET_TIMEOUT_S,
        socket_connect_timeout=cfg.redis_timeout_s))
    jobs = (None if jobs_client is None else JobQueue(
        jobs_client, what.jobs, consumer=f"{socket.gethostname()}-{os.getpid()}-"
                                         f"{uuid.uuid4().hex[:6]}"))
    servicer = GenerationServicer(pipeline=pipeline, catalog=catalog,
                                  max_generation_s=cfg.max_generation_s,
                                  max_session_turns=cfg.max_session_turns, admission=admission,
                                  jobs=jobs, max_batch_inflight=what.max_batch_inflight)
    runner = (None if jobs is None else asyncio.ensure_future(JobRunner(
        jobs, pipeline=pipeline, catalog=catalog, max_running=what.max_running_jobs,
        claim_timeout_s=what.jobs.claim_timeout_s, timeout_s=cfg.max_generation_s).run()))

    async def close_channels() -> None:
        if runner is not None:  # running jobs stop; other frontends take them over
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        if jobs_client is not None:
            await jobs_client.aclose()
        await tokenizer_channel.close()
        await worker_channel.close()
        for channel in (safety_channel, cache_channel):
            if channel is not None:
                await channel.close()
        telemetry.shutdown()
        if redis is not None:
            await redis.aclose()

    authorization = AuthorizationServicer(what.keys,
                                          key_header=what.admission.api_key_header)

    def register(server: grpc.aio.Server) -> None:
        generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
        authz_grpc.add_AuthorizationServicer_to_server(authorization, server)

    await serve(tls=tls, health_port=cfg.health_port, name="genmesh.frontend",
                address=cfg.address, register=register,
                service_names=[generation_pb2.DESCRIPTOR.services_by_name["Generation"]
                               .full_name,
                               authz_pb2.DESCRIPTOR.services_by_name["Authorization"]
                               .full_name],
                grace_s=cfg.shutdown_grace_s, on_stop=close_channels,
                interceptors=telemetry.server_interceptors())


def main(argv: list[str] | None = None) -> int:
    return run_service(FrontendConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
