"""`genmesh fault soak`: ``num_streams`` concurrent streaming generations through Envoy's
edge for ``warmup_s + duration_s``, a ``cancel_fraction`` of them cancelled by the
client at a random point, one after another on every slot. Judged at the end:
- no error but the configured limits (RESOURCE_EXHAUSTED naming a limit) and the
  client's own cancels;
- the worker's KV pool all free once it is idle;
- every process's resident memory (RSS) within ``max_rss_growth`` of its value after
  the warm-up.

The warm-up lasts ``warmup_s`` at least and then until every process's RSS has settled
(grown at most ``warmup_settle`` over the last WARMUP_WINDOW_S), ``max_warmup_s`` at
most: a process that keeps growing (a leak) never settles and is judged after
``max_warmup_s`` like any other. The mesh's capped Redis streams (safety's audit
records, the worker's generation records) are capped at ``retention_records`` so they
fill during the warm-up: their growth up to the cap is data kept by design, and the
soak checks that the cap holds rather than counting retention as a leak.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from genmesh.bench.fault_mesh import Mesh, supervised_mesh, wait_for
from genmesh.client.types import DEV_API_KEY
from genmesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc

PROMPTS = ("Tell me about the sea.", "Write a haiku about autumn.",
           "What is a prime number?", "Describe a busy market in the morning.",
           "Explain why the sky is blue.", "List three uses of a paperclip.")
ALLOWED = frozenset({"OK", "RESOURCE_EXHAUSTED"})  # RESOURCE_EXHAUSTED: a configured limit
REFUSED_PAUSE_S = 1.0  # a refused slot waits this long, as the refusal's retry-after says
RSS_SAMPLE_S = 10.0
WARMUP_WINDOW_S = 30.0


@dataclass(frozen=True, slots=True)
class SoakConfig:
    num_streams: int = 64
    duration_s: float = 120.0  # measured, after the warm-up
    # Long enough for the worker to reach its busiest batch on a shared 2-core machine: at
    # 20 s its engine process was still growing to a plateau (+11 % over the next 50 s).
    warmup_s: float = 60.0
    max_warmup_s: float = 300.0
    warmup_settle: float = 0.02
    retention_records: int = 200  # caps of the audit and generation-record streams
    cancel_fraction: float = 0.3  # streams the client cancels after a random few replies
    min_tokens: int = 8
    max_tokens: int = 64
    max_rss_growth: float = 0.10
    # Generous: 64 streams on a shared 2-core machine may get well under 1 token/s each.
    call_timeout_s: float = 300.0
    api_key: str = DEV_API_KEY
    seed: int = 0
    kv_cache_gib: float = 0.5


@dataclass
class SoakResult:
    codes: dict[str, int]  # outcome -> streams ("CANCELLED by client" for our cancels)
    errors: dict[str, int]  # "CODE: message" -> streams, outside ALLOWED
    refusals: dict[str, int]  # the configured limits' messages -> streams they refused
    kv_blocks_total: int
    kv_blocks_free: int  # once the worker was idle after the load
    rss_after_warmup_mib: dict[str, float]
    rss_at_end_mib: dict[str, float]
    max_rss_growth: float
    restarts: dict[str, int]  # process -> restarts during the soak (none expected)
    # Every RSS_SAMPLE_S from the warm-up's end to the end: growth that levels off is
    # the working set of a busier moment, growth that goes on is a leak.
    rss_samples_mib: dict[str, list[float]]
    duration_s: float
    num_streams: int
    generated_tokens: int = 0  # by the worker during the measured part
    warmup_s: float = 0.0  # how long the warm-up took

    def rss_growth(self) -> dict[str, float]:
        return {name: self.rss_at_end_mib[name] / before - 1
                for name, before in self.rss_after_warmup_mib.items()
                if name in self.rss_at_end_mib and before > 0}

    @property
    def is_passed(self) -> bool:
        return (not self.errors and self.kv_blocks_free == self.kv_blocks_total
                and all(g <= self.max_rss_growth for g in self.rss_growth().values())
                and not any(self.restarts.values()))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "rss_growth": self.rss_growth(), "passed": self.is_passed}


def is_settled(samples: dict[str, list[float]], *, window: int, tolerance: float) -> bool:
    """Whether every process's RSS grew at most ``tolerance`` (a fraction) over its last
    ``window`` samples (False until each has ``window + 1``)."""
    return all(len(series) > window and series[-1] <= series[-1 - window] * (1 + tolerance)
               for series in samples.values())


@dataclass
class _Tally:
    codes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)


def outcome(code: str, details: str, *, is_cancelled_by_client: bool) -> tuple[str, str | None]:
    """A stream's outcome for the tally, and its error line when it counts as one."""
    if is_cancelled_by_client and code == "CANCELLED":
        return "CANCELLED by client", None
    if code in ALLOWED:
        return code, None
    return code, f"{code}: {details[:120]}"


async def _one_stream(stub: generation_pb2_grpc.GenerationStub, rng: random.Random,
                      config: SoakConfig, tally: _Tally) -> bool:
    """One stream to its end; False when a limit refused it."""
    max_tokens = rng.randint(config.min_tokens, config.max_tokens)
    cancel_after = (rng.randint(1, max(1, max_tokens // 2))
                    if rng.random() < config.cancel_fraction else None)
    request = generation_pb2.GenerateRequest(
        prompt=f"{rng.choice(PROMPTS)} ({rng.randrange(10**6)})",
        params=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.7))
    call = stub.GenerateStream(request, metadata=(("x-api-key", config.api_key),),
                               timeout=config.call_timeout_s)
    num_replies, is_cancelled = 0, False
    try:
        async for _ in call:
            num_replies += 1
            if cancel_after is not None and num_replies >= cancel_after:
                is_cancelled = call.cancel()
                break
        code, details = "OK", ""
        if is_cancelled:
            code = "CANCELLED"
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code().name, exc.details() or ""
    except asyncio.CancelledError:
        code, details, is_cancelled = "CANCELLED", "", True
    name, error = outcome(code, details, is_cancelled_by_client=is_cancelled)
    tally.codes[name] += 1
    if error is not None:
        tally.errors[error] += 1
    if code == "RESOURCE_EXHAUSTED":
        tally.refusals[details[:80]] += 1
        return False
    return True


async def _drive(edge: str, config: SoakConfig, stop: threading.Event, tally: _Tally) -> None:
    async with grpc.aio.insecure_channel(edge) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)

        async def slot(n: int) -> None:
            rng = random.Random(config.seed * 1000 + n)
            while not stop.is_set():
                if not await _one_stream(stub, rng, config, tally):
                    await asyncio.sleep(REFUSED_PAUSE_S)

        await asyncio.gather(*(slot(n) for n in range(config.num_streams)))


def run_soak(config: SoakConfig, *, run_dir: Path) -> SoakResult:
    run_dir.mkdir(parents=True, exist_ok=True)
    caps = str(config.retention_records)
    env = {"GENMESH_SAFETY_AUDIT_MAX_RECORDS": caps, "GENMESH_WORKER_RECORD_MAX_ENTRIES": caps}
    with supervised_mesh(run_dir, kv_cache_gib=config.kv_cache_gib, env=env) as mesh:
        stop = threading.Event()
        tally = _Tally()
        driver = threading.Thread(target=lambda: asyncio.run(_drive(mesh.edge_address, config,
                                                                    stop, tally)),
                                  name="soak", daemon=True)
        driver.start()
        warmup_s = _warm_up(mesh, config)
        rss_after_warmup = mesh.resident_mib()
        tokens_before = mesh.worker_stats().generated_tokens
        started = time.monotonic()
        samples: dict[str, list[float]] = {name: [mib] for name, mib in rss_after_warmup.items()}
        while (left_s := config.duration_s - (time.monotonic() - started)) > 0:
            time.sleep(min(RSS_SAMPLE_S, left_s))
            for name, mib in mesh.resident_mib().items():
                samples.setdefault(name, []).append(mib)
        rss_at_end = {name: series[-1] for name, series in samples.items()}
        tokens_at_end = mesh.worker_stats().generated_tokens
        duration_s = time.monotonic() - started
        stop.set()
        driver.join(timeout=config.call_timeout_s + 10)
        stats = _idle_stats(mesh)
        restarts = {r.name: r.num_restarts for r in mesh.supervisor.records()}
    return SoakResult(dict(tally.codes), dict(tally.errors), dict(tally.refusals),
                      stats.num_kv_blocks_total, stats.num_kv_blocks_free, rss_after_warmup,
                      rss_at_end, config.max_rss_growth, restarts, samples, duration_s,
                      config.num_streams, tokens_at_end - tokens_before, warmup_s)


def _warm_up(mesh: Mesh, config: SoakConfig) -> float:
    """Sleeps until the warm-up is over (see the module's doc); its length in seconds."""
    started = time.monotonic()
    history: dict[str, list[float]] = {}
    window = round(WARMUP_WINDOW_S / RSS_SAMPLE_S)
    while True:
        for name, mib in mesh.resident_mib().items():
            history.setdefault(name, []).append(mib)
        elapsed = time.monotonic() - started
        if elapsed >= config.max_warmup_s or (
                elapsed >= config.warmup_s
                and is_settled(history, window=window, tolerance=config.warmup_settle)):
            return elapsed
        time.sleep(min(RSS_SAMPLE_S, config.max_warmup_s - elapsed))


def _idle_stats(mesh: Mesh) -> Any:
    """The worker's stats once nothing runs or waits and its blocks are free (5 s at most
    for the blocks after it went idle)."""
    wait_for(lambda: not (s := mesh.worker_stats()).num_running and not s.num_waiting,
             timeout_s=30)
    wait_for(lambda: (s := mesh.worker_stats()).num_kv_blocks_free == s.num_kv_blocks_total,
             timeout_s=5)
    return mesh.worker_stats()


def format_soak(r: SoakResult) -> str:
    growth = r.rss_growth()
    lines = [f"soak: {r.num_streams} streams for {r.duration_s:.0f} s after a warm-up of "
             f"{r.warmup_s:.0f} s; "
             f"{r.generated_tokens} tokens generated meanwhile "
             f"({r.generated_tokens / max(r.duration_s, 1e-9):.0f} tokens/s)",
             "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(r.codes.items())),
             f"errors (other than configured limits and the client's cancels): "
             f"{sum(r.errors.values())}"]
    lines += [f"  {n:5d} {e}" for e, n in sorted(r.errors.items(), key=lambda kv: -kv[1])[:10]]
    lines += [f"refused by a configured limit: {sum(r.refusals.values())}"]
    lines += [f"  {n:5d} {e}" for e, n in sorted(r.refusals.items(), key=lambda kv: -kv[1])[:5]]
    lines += [f"KV blocks free at the end: {r.kv_blocks_free}/{r.kv_blocks_total}",
              f"restarts: {sum(r.restarts.values())}",
              "| process | RSS after warm-up (MiB) | RSS at the end (MiB) | growth |",
              "| --- | --- | --- | --- |"]
    for name in sorted(r.rss_after_warmup_mib):
        end = r.rss_at_end_mib.get(name)
        lines.append(f"| {name} | {r.rss_after_warmup_mib[name]:.1f} | "
                     f"{'-' if end is None else f'{end:.1f}'} | "
                     f"{growth[name]:+.1%} |" if name in growth else f"| {name} | - | - | - |")
    for name, series in sorted(r.rss_samples_mib.items()):
        if abs(growth.get(name, 0.0)) > r.max_rss_growth / 2:
            lines.append(f"{name} RSS every {RSS_SAMPLE_S:g} s (MiB): "
                         + " ".join(f"{mib:.0f}" for mib in series))
    lines.append(f"passed: {'yes' if r.is_passed else 'NO'}")
    return "\n".join(lines)
