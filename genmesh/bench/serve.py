"""`genmesh bench serve`: a load generator against a running mesh, and the same load
against the seed document's pattern, in one run.

For each load level (a fixed number of conversations in flight, or a Poisson arrival
rate of conversations) the level's own prompts (seeded, identical for every target) are
sent, and TTFT, TPOT, ITL and end-to-end latency, throughput and goodput under the SLO
are computed from per-request timings (``serve_metrics``). Every level is bounded: by
its number of requests, and by ``duration_limit_s``, after which requests still running
are cancelled and counted as such. Targets run one after the other, never at once: on a
small machine they share the cores.

With ``--baseline seed-fastapi`` the result holds ``goodput_ratio``: the mesh's goodput
over the baseline's, per level and at each one's best level. With ``--http`` the same
load also goes through the mesh's OpenAI-compatible HTTP API (target ``mesh-http``), and
``http_goodput_ratio`` is its goodput over the gRPC API's.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from genmesh.bench.serve_clients import Backend, MeshBackend, OpenAIBackend, SeedBackend
from genmesh.bench.serve_metrics import RequestRecord, RequestStatus, Slo, summarize_level
from genmesh.bench.serve_workload import (
    Conversation,
    WorkloadSpec,
    make_workload,
    poisson_arrivals,
)
from genmesh.client import AsyncClient

MESH, MESH_HTTP, SEED_FASTAPI = "mesh", "mesh-http", "seed-fastapi"
BASELINES = (SEED_FASTAPI,)


@dataclass(frozen=True, slots=True)
class LoadLevel:
    """Exactly one of the two is set."""

    concurrency: int | None = None  # conversations in flight at once
    request_rate: float | None = None  # conversations started per second (Poisson)

    @property
    def label(self) -> str:
        if self.concurrency is not None:
            return str(self.concurrency)
        assert self.request_rate is not None
        return f"{self.request_rate:g}"


@dataclass(frozen=True, slots=True)
class ServeBenchConfig:
    levels: tuple[LoadLevel, ...]
    workload: WorkloadSpec
    max_tokens: int  # output tokens of every request (EOS ignored)
    slo: Slo
    seed: int = 0
    duration_limit_s: float = 120.0  # per level and target: then the rest is cancelled
    request_timeout_s: float = 120.0  # per request (a chat session: per turn)
    num_warmups: int = 2  # unmeasured requests before each target's first level
    model: str = "smollm2-135m-instruct"  # a model of the store (the baseline loads it)
    dtype: str = "bfloat16"  # the baseline's (and a started mesh's) dtype


async def run_level(backend: Backend, conversations: list[Conversation], level: LoadLevel,
                    *, seed: int, duration_limit_s: float
                    ) -> tuple[list[RequestRecord], float]:
    """Every conversation's records (one per turn), and the level's duration: from the
    first send to the last answer, or to the limit if requests had to be cancelled."""
    records: list[RequestRecord] = []
    if level.concurrency is not None:
        gate: asyncio.Semaphore | None = asyncio.Semaphore(level.concurrency)
        delays = [0.0] * len(conversations)
    else:
        assert level.request_rate is not None
        gate = None
        delays = poisson_arrivals(len(conversations), level.request_rate, seed=seed)

    async def one(conversation: Conversation, delay_s: float) -> None:
        got: list[RequestRecord] = []
        status, error = RequestStatus.FAILED, "an earlier turn of the conversation failed"
        try:
            await asyncio.sleep(delay_s)
            async with gate or contextlib.nullcontext():
                await backend.converse(conversation, got.append)
        except asyncio.CancelledError:
            status, error = RequestStatus.CANCELLED, ""
            raise
        except Exception as exc:  # anything a backend did not turn into a record
            error = f"{type(exc).__name__}: {exc}"
        finally:
            now = time.perf_counter()
            missing = len(conversation.user_turns) - len(got)
            records.extend(got + [RequestRecord(now, (), now, 0, 0, status, error)] * missing)

    start = time.perf_counter()
    tasks = [asyncio.create_task(one(c, d)) for c, d in zip(conversations, delays, strict=True)]
    _, pending = await asyncio.wait(tasks, timeout=duration_limit_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    end = max((r.end_s for r in records), default=start)
    return records, end - start


async def sweep(backend: Backend, config: ServeBenchConfig, *, name: str) -> dict[str, Any]:
    """Warm-ups, then every level in order; a summary per level, keyed by its label."""
    warmup = WorkloadSpec("mixed", num_requests=config.num_warmups, max_input_words=64)
    for conversation in make_workload(warmup, tag="warmup", seed=config.seed):
        await backend.converse(conversation, lambda _: None)
    out = {}
    for i, level in enumerate(config.levels):
        conversations = make_workload(config.workload, tag=f"L{i}", seed=config.seed)
        records, duration_s = await run_level(backend, conversations, level,
                                              seed=config.seed + i,
                                              duration_limit_s=config.duration_limit_s)
        out[level.label] = summarize_level(records, duration_s=duration_s, slo=config.slo)
        _progress(name, level, out[level.label])
    return out


def _progress(name: str, level: LoadLevel, s: dict[str, Any]) -> None:
    kind = "concurrency" if level.concurrency is not None else "rate"
    print(f"[bench serve] {name} {kind}={level.label}: {s['num_completed']}/"
          f"{s['num_requests']} ok in {s['duration_s']} s, {s['output_throughput']} tok/s, "
          f"TTFT p50 {s['ttft_ms']['p50']} ms, TPOT p50 {s['tpot_ms']['p50']} ms, "
          f"goodput {s['goodput']} req/s", file=sys.stderr, flush=True)


async def sweep_mesh(address: str, config: ServeBenchConfig, *, api_key: str | None
                     ) -> dict[str, Any]:
    # A chat is one call for all its turns; anything else one call per request.
    num_calls = config.workload.num_turns if config.workload.name == "chat" else 1
    async with AsyncClient(address, timeout_s=config.request_timeout_s * num_calls,
                           api_key=api_key) as client:
        return await sweep(MeshBackend(client, max_tokens=config.max_tokens), config,
                           name=MESH)


async def sweep_http(address: str, config: ServeBenchConfig, *, api_key: str | None
                     ) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=f"http://{address}/v1", timeout=(
            config.request_timeout_s), limits=limits,
            headers={"authorization": f"Bearer {api_key}"} if api_key else {}) as http:
        return await sweep(OpenAIBackend(http, model=config.model,
                                         max_tokens=config.max_tokens), config, name=MESH_HTTP)


async def sweep_seed(url: str, config: ServeBenchConfig) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=config.request_timeout_s,
                                 limits=limits) as http:
        return await sweep(SeedBackend(http, max_tokens=config.max_tokens), config,
                           name=SEED_FASTAPI)


@contextlib.contextmanager
def started_mesh(config: ServeBenchConfig, *, kv_cache_gib: float, run_dir: Path
                 ) -> Iterator[str]:
    """What `genmesh up` runs (the first version only, no Prometheus), on free loopback
    ports, until the block ends; yields the edge address."""
    from genmesh.launcher.plan import PORT_FIELDS, MeshConfig, plan
    from genmesh.launcher.ports import free_ports
    from genmesh.launcher.supervisor import Supervisor

    ports: dict[str, Any] = dict(zip(PORT_FIELDS, free_ports(len(PORT_FIELDS)), strict=True))
    mesh = MeshConfig(**ports, model=config.model, versions=("v1",), dtype=config.dtype,
                      kv_cache_gib=kv_cache_gib, run_dir=run_dir, log_level="WARNING",
                      with_prometheus=False)
    supervisor = Supervisor(plan(mesh), run_dir=run_dir)
    supervisor.start()
    try:
        supervisor.wait_ready(timeout_s=300)
        yield mesh.edge_address
    finally:
        supervisor.stop()


def goodput_ratios(mesh: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """The mesh's goodput over the baseline's, per level and at each one's best level
    (None where the baseline's goodput is 0: no finite ratio)."""
    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 2) if b > 0 else None

    def best(levels: dict[str, Any], scale: str) -> float:
        return max(level["goodput_by_slo_scale"][scale] for level in levels.values())

    per_level = {k: ratio(mesh[k]["goodput"], baseline[k]["goodput"]) for k in mesh}
    best_mesh = max(level["goodput"] for level in mesh.values())
    best_baseline = max(level["goodput"] for level in baseline.values())
    scales = next(iter(mesh.values()))["goodput_by_slo_scale"]
    return {"per_level": per_level, "best_level": ratio(best_mesh, best_baseline),
            "best_goodput": {MESH: best_mesh, SEED_FASTAPI: best_baseline},
            # the best-level ratio with both SLO bounds multiplied by each factor
            "best_level_by_slo_scale": {s: ratio(best(mesh, s), best(baseline, s))
                                        for s in scales}}


def run_serve_bench(config: ServeBenchConfig, *, target: str | None, api_key: str | None,
                    baseline: str | None, kv_cache_gib: float = 1.0,
                    http: bool = False) -> dict[str, Any]:
    """The whole run: the mesh at ``target`` (None: start one, and stop it after), its
    HTTP API too with ``http``, then the baseline if asked; the JSON-ready result."""
    from genmesh.core.models.store import ModelStore, default_store_root

    result: dict[str, Any] = {
        "bench": "serve", "model": config.model, "dtype": config.dtype,
        "workload": asdict(config.workload), "max_tokens": config.max_tokens,
        "load": {"kind": "concurrency" if config.levels[0].concurrency is not None
                 else "request_rate", "levels": [lv.label for lv in config.levels]},
        "slo": asdict(config.slo), "seed": config.seed,
        "duration_limit_s": config.duration_limit_s, "targets": {},
    }
    with tempfile.TemporaryDirectory(prefix="genmesh-bench-serve-") as tmp:
        with (started_mesh(config, kv_cache_gib=kv_cache_gib, run_dir=Path(tmp))
              if target is None else contextlib.nullcontext(target)) as address:
            mesh = asyncio.run(sweep_mesh(address, config, api_key=api_key))
            if http:
                over_http = asyncio.run(sweep_http(address, config, api_key=api_key))
        result["targets"][MESH] = {"address": address, "started_here": target is None,
                                   "levels": mesh}
        if http:
            result["targets"][MESH_HTTP] = {"address": f"http://{address}/v1",
                                            "levels": over_http}
            result["http_goodput_ratio"] = {
                k: round(over_http[k]["goodput"] / mesh[k]["goodput"], 2)
                if mesh[k]["goodput"] > 0 else None for k in mesh}
        if baseline == SEED_FASTAPI:
            from genmesh.bench.seed_fastapi import seed_server

            model_dir = ModelStore(default_store_root()).ensure(config.model)
            with seed_server(model_dir, dtype=config.dtype,
                             log_path=Path(tmp) / "seed-fastapi.log") as url:
                seed = asyncio.run(sweep_seed(url, config))
            result["targets"][SEED_FASTAPI] = {
                "pattern": "FastAPI sync endpoint, one blocking HF generate per request "
                           "(streamed token by token)", "levels": seed}
            result["goodput_ratio"] = goodput_ratios(mesh, seed)
        elif baseline is not None:
            raise ValueError(f"unknown baseline {baseline!r}; baselines: {BASELINES}")
    return result
