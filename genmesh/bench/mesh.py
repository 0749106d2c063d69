"""`genmesh bench mesh`: what the mesh adds to a generation, measured in one run.

The same chat prompts run twice: first against the engine in this process (the floor),
then through the whole mesh started by the launcher (Envoy edge → frontend → tokenizer
and safety → Envoy mesh → worker, whose engine core runs in its own process unless
``engine_process=False``). Both see identical prompts in the same order, at 1 and 32
concurrent streams. Reported: time to first token, per-token latency (gap between
consecutive arrivals) and time per output token p50/p99, the differences, throughput,
and the CPU per token of every process (the engine apart from the rest), over the
measured rounds and at each level; the warm-up's CPU apart, per request.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from genmesh.client import AsyncClient
from genmesh.client.types import DEV_API_KEY
from genmesh.core.models.chat_template import ChatMessage, ChatTemplate, load_chat_template
from genmesh.launcher.plan import PORT_FIELDS, MeshConfig, plan
from genmesh.launcher.ports import free_ports
from genmesh.launcher.supervisor import Supervisor
from services.worker.engine.async_engine import AsyncEngine
from services.worker.engine.config import EngineConfig
from services.worker.engine.params import SamplingParams

TARGET_ADDED_TTFT_MS = 5.0
TARGET_ADDED_PER_TOKEN_MS = 0.5
TARGET_THROUGHPUT_RATIO = 0.85  # mesh over in-process at the top concurrency, on a CPU
TARGET_NON_ENGINE_CPU_MS_PER_TOKEN = 0.4
TARGET_MTLS_THROUGHPUT_RATIO = 0.95  # the mesh with mutual TLS over without (issue 20)


@dataclass(frozen=True, slots=True)
class MeshBenchPlan:
    concurrency: tuple[int, ...]
    rounds: dict[int, int]  # rounds of `concurrency` simultaneous streams, per level
    output_len: int  # tokens per stream (ignore_eos, so every stream is this long)


FULL = MeshBenchPlan(concurrency=(1, 32), rounds={1: 12, 32: 3}, output_len=64)
# 64 tokens a stream: a 32-stream round of 16 lasts about as long as the burst of 32
# requests entering the mesh, so its throughput ratio measured the burst alone and
# scattered from run to run; `--output-len 16` still runs that.
QUICK = MeshBenchPlan(concurrency=(1, 32), rounds={1: 2, 32: 1}, output_len=64)
# `--mtls --quick`: four meshes of a few rounds each; a single 32-stream round scattered
# by ±8 % from mesh to mesh, more than what is measured.
QUICK_MTLS = MeshBenchPlan(concurrency=(1, 32), rounds={1: 4, 32: 3}, output_len=64)


@dataclass(frozen=True, slots=True)
class StreamTiming:
    ttft_s: float
    gaps_s: list[float]  # between consecutive arrivals of text (a chunk may hold tokens)
    # Time per output token from token counts: (last arrival - first) / (tokens - 1);
    # None for a stream of one token.
    tpot_s: float | None = None


def questions(n: int, offset: int) -> list[str]:
    topics = ["rivers", "prime numbers", "volcanoes", "bread", "chess", "the moon", "rain",
              "bees", "glass", "magnets", "clocks", "maps"]
    return [f"Question {offset + i}: tell me one fact about {topics[(offset + i) % len(topics)]}."
            for i in range(n)]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc), e.g. a worker's engine core."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _processes(pids: dict[str, int]) -> dict[str, int]:
    """Every process to account CPU for: the mesh's, plus each one's children, named
    ``<parent>/engine`` for a worker's engine core (multiprocessing's resource tracker
    beside it is ``<parent>/tracker``) and ``<parent>/<pid>`` otherwise."""
    out = dict(pids)
    for name, pid in pids.items():
        for child in _children(pid):
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"resource_tracker" in cmdline:
                out[f"{name}/tracker"] = child
            elif name.startswith("worker") and b"spawn_main" in cmdline:
                out[f"{name}/engine"] = child
            else:
                out[f"{name}/{child}"] = child
    return out


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def summarize(timings: list[StreamTiming]) -> dict[str, float]:
    ttfts = [t.ttft_s * 1e3 for t in timings]
    gaps = [g * 1e3 for t in timings for g in t.gaps_s]
    tpots = [t.tpot_s * 1e3 for t in timings if t.tpot_s is not None]
    out = {"ttft_ms_p50": round(statistics.median(ttfts), 3),
           "ttft_ms_p99": round(_pct(ttfts, 0.99), 3),
           "per_token_ms_p50": round(statistics.median(gaps), 3),
           "per_token_ms_p99": round(_pct(gaps, 0.99), 3),
           "num_streams": len(timings), "num_gaps": len(gaps)}
    if tpots:
        out |= {"tpot_ms_p50": round(statistics.median(tpots), 3),
                "tpot_ms_p99": round(_pct(tpots, 0.99), 3)}
    return out


async def _timed(stream: Any, has_token: Any, count_tokens: Any) -> StreamTiming:
    """``has_token(item)``: the item carries text; ``count_tokens(item)``: the tokens it
    accounts for (a delta's ids, or the completion tokens of the final usage)."""
    t0 = time.perf_counter()
    arrivals = []
    num_tokens = 0
    async for item in stream:
        if has_token(item):
            arrivals.append(time.perf_counter())
        num_tokens += count_tokens(item)
    tpot = ((arrivals[-1] - arrivals[0]) / (num_tokens - 1)
            if num_tokens > 1 and len(arrivals) > 1 else None)
    return StreamTiming(arrivals[0] - t0, [b - a for a, b in itertools.pairwise(arrivals)],
                        tpot)


WARM_UP_STREAMS = 4
WARM_UP = "warm_up"


async def _levels(run_one: Any, bench: MeshBenchPlan, *, mark: Callable[[str], None]
                  ) -> dict[str, dict[str, float]]:
    """Warm up once (``WARM_UP_STREAMS`` streams at once), then every level: rounds of
    ``c`` simultaneous streams. ``mark(name)`` is called as each part ends (``WARM_UP``,
    then ``str(c)``): where a meter takes its readings."""
    await asyncio.gather(*(run_one(q) for q in questions(WARM_UP_STREAMS, offset=10_000)))
    mark(WARM_UP)
    out, offset = {}, 0
    for c in bench.concurrency:
        timings: list[StreamTiming] = []
        t0 = time.perf_counter()
        for _ in range(bench.rounds[c]):
            timings += await asyncio.gather(*(run_one(q) for q in questions(c, offset)))
            offset += c
        wall_s = time.perf_counter() - t0
        mark(str(c))
        out[str(c)] = summarize(timings) | {
            "tokens_per_s": round(c * bench.rounds[c] * bench.output_len / wall_s, 2)}
    return out


def _tokens(bench: MeshBenchPlan, level: int | None = None) -> int:
    """Tokens generated by a run's rounds (the warm-up apart), or by one level's."""
    levels = bench.concurrency if level is None else (level,)
    return bench.output_len * sum(c * bench.rounds[c] for c in levels)


@dataclass(frozen=True, slots=True)
class CpuUse:
    """CPU milliseconds of each process (and the client's): per generated token over the
    measured rounds, per token at each level, and per request of the warm-up."""

    per_token: dict[str, float]
    per_token_by_level: dict[str, dict[str, float]]
    warm_up_per_request: dict[str, float]


class _CpuMeter:
    """CPU seconds of named processes (and of this one, as "client"), read at the start
    and as each part of a run ends (``mark``). What is charged per token is what the
    measured rounds used; the warm-up (a fresh mesh's first calls, and four streams at
    once whose tokens cross each hop one message apiece, as at one stream) is apart."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.readings = [("start", self._now())]

    def _now(self) -> dict[str, float]:
        return {name: _cpu_s(pid) for name, pid in self.pids.items()} | {
            "client": _self_cpu_s()}

    def mark(self, name: str) -> None:
        self.readings.append((name, self._now()))

    def use(self, bench: MeshBenchPlan) -> CpuUse:
        at = dict(self.readings)
        names = list(at)
        by_level = {}
        for before, level in itertools.pairwise(names[1:]):
            by_level[level] = _per(at[before], at[level], _tokens(bench, int(level)))
        return CpuUse(per_token=_per(at[WARM_UP], at[names[-1]], _tokens(bench)),
                      per_token_by_level=by_level,
                      warm_up_per_request=_per(at["start"], at[WARM_UP], WARM_UP_STREAMS))


def _per(before: dict[str, float], after: dict[str, float], count: int) -> dict[str, float]:
    return {name: round((after[name] - before[name]) * 1e3 / count, 4) for name in after}


def in_process(model_dir: Path, dtype: str, kv_cache_gib: float, bench: MeshBenchPlan, *,
               device: str = "cpu", dummy: bool = False
               ) -> tuple[dict[str, dict[str, float]], CpuUse]:
    """Latencies per level, and this process's CPU (as "client")."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    source = load_chat_template(model_dir)
    assert source is not None, "the benchmark model needs a chat template"
    template = ChatTemplate(source)
    params = SamplingParams(max_tokens=bench.output_len, ignore_eos=True)
    engine = AsyncEngine(EngineConfig(model=str(model_dir), dtype=dtype, device=device,
                                      load_format="dummy" if dummy else "auto",
                                      kv_cache_memory_gib=kv_cache_gib))

    async def run_one(question: str) -> StreamTiming:
        # What the tokenizer service does for a chat: render the template, then encode.
        text = template.render([ChatMessage("user", question)])
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        return await _timed(engine.submit(ids, params), lambda d: bool(d.new_token_ids),
                            lambda d: len(d.new_token_ids))

    try:
        meter = _CpuMeter({})
        levels = asyncio.run(_levels(run_one, bench, mark=meter.mark))
        return levels, meter.use(bench)
    finally:
        engine.shutdown()


def through_mesh(model: str, dtype: str, kv_cache_gib: float, bench: MeshBenchPlan, *,
                 otlp_endpoint: str = "", device: str = "cpu", dummy: bool = False,
                 engine_process: bool = True, mtls: bool | None = None
                 ) -> tuple[dict[str, dict[str, float]], CpuUse]:
    """Latencies per level, and each process's CPU (the client's included): the mesh's
    cost independent of how many cores it shares with the engine. ``otlp_endpoint``:
    every process exports its spans there (""; no tracing). ``mtls``: mutual TLS inside
    the mesh (None: as deploy/local.yaml says, on)."""
    with tempfile.TemporaryDirectory(prefix="genmesh-bench-") as run_dir:
        ports: dict[str, Any] = dict(zip(PORT_FIELDS, free_ports(len(PORT_FIELDS)),
                                         strict=True))
        config = MeshConfig(**ports, model=model, versions=("v1",), dtype=dtype,
                            kv_cache_gib=kv_cache_gib, with_redis=False, run_dir=Path(run_dir),
                            log_level="WARNING", with_prometheus=False,
                            otlp_endpoint=otlp_endpoint, mtls=mtls,
                            worker_args=worker_flags(device=device, dummy=dummy,
                                                     engine_process=engine_process))
        supervisor = Supervisor(plan(config), run_dir=config.run_dir)
        supervisor.start()
        try:
            supervisor.wait_ready(timeout_s=300)
            pids = _processes({s.name: s.pid for s in supervisor.statuses()
                               if s.pid is not None})
            meter = _CpuMeter(pids)
            levels = asyncio.run(_mesh_levels(config.edge_address, bench, meter.mark))
            return levels, meter.use(bench)
        finally:
            supervisor.stop()


async def _mesh_levels(address: str, bench: MeshBenchPlan, mark: Callable[[str], None]
                       ) -> dict[str, dict[str, float]]:
    async with AsyncClient(address, timeout_s=300, api_key=DEV_API_KEY) as client:
        async def run_one(question: str) -> StreamTiming:
            stream = client.generate_stream(
                messages=[{"role": "user", "content": question}],
                max_tokens=bench.output_len, ignore_eos=True)
            return await _timed(stream, lambda chunk: bool(chunk.text),
                                lambda chunk: chunk.usage.completion_tokens if chunk.usage
                                else 0)

        return await _levels(run_one, bench, mark=mark)


def worker_flags(*, device: str, dummy: bool, engine_process: bool = True
                 ) -> tuple[str, ...]:
    """The workers' extra flags for a device, random weights and where the core runs."""
    flags: tuple[str, ...] = ("--device", device) if device != "cpu" else ()
    flags += ("--engine-process", "true" if engine_process else "false")
    return flags + (("--load-format", "dummy") if dummy else ())


def non_engine_cpu_ms(mesh_cpu: dict[str, float], *, engine_alone: float) -> float:
    """CPU ms per token of everything in the mesh but the engine, the client apart. A
    worker whose core runs in a child process reports it as ``<worker>/engine``; one
    whose core is a thread is charged what it uses beyond the engine alone."""
    has_core_process = any(name.endswith("/engine") for name in mesh_cpu)
    total = 0.0
    for name, ms in mesh_cpu.items():
        if name == "client" or name.endswith("/engine"):
            continue
        if name.startswith("worker") and not has_core_process:
            ms = max(0.0, ms - engine_alone)
        total += ms
    return round(total, 4)


def run_mesh_bench(model_dir: Path, *, model: str, dtype: str, kv_cache_gib: float,
                   bench: MeshBenchPlan, device: str = "cpu", dummy: bool = False,
                   engine_process: bool = True) -> dict[str, Any]:
    direct, direct_cpu = in_process(model_dir, dtype, kv_cache_gib, bench, device=device,
                                    dummy=dummy)
    meshed, cpu = through_mesh(model, dtype, kv_cache_gib, bench, device=device, dummy=dummy,
                               engine_process=engine_process)
    keys = ("ttft_ms_p50", "ttft_ms_p99", "per_token_ms_p50", "per_token_ms_p99",
            "tpot_ms_p50", "tpot_ms_p99")
    added = {c: {k: round(meshed[c][k] - direct[c][k], 3) for k in keys
                 if k in meshed[c] and k in direct[c]} for c in direct}
    top = str(max(bench.concurrency))
    return {
        "model": model, "dtype": dtype, "device": device, "dummy_weights": dummy,
        "output_tokens": bench.output_len, "engine_process": engine_process,
        "path": "client → Envoy edge → frontend (tokenizer: template; detokenize in "
                "process; safety: prompt check, adaptive moderation) → Envoy mesh → "
                "worker" + (" → its engine process" if engine_process else ""),
        "in_process": direct, "mesh": meshed, "added": added,
        "added_ttft_ms_p50": added[top]["ttft_ms_p50"],
        "added_per_token_ms_p50": added[top]["per_token_ms_p50"],
        "added_tpot_ms_p50": added[top].get("tpot_ms_p50"),
        # Throughput through the mesh over in-process, at the top concurrency.
        "throughput_ratio": round(meshed[top]["tokens_per_s"] / direct[top]["tokens_per_s"],
                                  3),
        # Where the CPU went, per generated token: the engine alone in-process vs each
        # process of the mesh. On a machine whose cores the engine saturates, every
        # millisecond the other processes take is taken from the engine's steps.
        "cpu_ms_per_token": {"in_process": direct_cpu.per_token["client"],
                             "mesh": cpu.per_token},
        # Everything but the engine's own work (the client, the load generator, apart),
        # over the measured rounds (the warm-up's requests apart: below).
        "non_engine_cpu_ms_per_token": (non_engine := non_engine_cpu_ms(
            cpu.per_token, engine_alone=direct_cpu.per_token["client"])),
        "non_engine_cpu_ms_per_request": round(non_engine * bench.output_len, 3),
        # The same at each level: at one stream every token crosses each hop as a
        # message of its own; at many, a reply carries several.
        "non_engine_cpu_ms_per_token_by_level": {
            level: non_engine_cpu_ms(
                ms, engine_alone=direct_cpu.per_token_by_level[level]["client"])
            for level, ms in cpu.per_token_by_level.items()},
        "cpu_ms_per_token_by_level": cpu.per_token_by_level,
        # The warm-up's requests (a fresh mesh's first, four at once), apart from the
        # figures above: CPU per request, per process (the engine's too).
        "warm_up_cpu_ms_per_request": cpu.warm_up_per_request,
        "cpu_cores": os.cpu_count(),
        "targets": {"added_ttft_ms_p50": TARGET_ADDED_TTFT_MS,
                    "added_per_token_ms_p50": TARGET_ADDED_PER_TOKEN_MS,
                    "throughput_ratio": TARGET_THROUGHPUT_RATIO,
                    "non_engine_cpu_ms_per_token": TARGET_NON_ENGINE_CPU_MS_PER_TOKEN},
    }


def run_mtls_bench(*, model: str, dtype: str, kv_cache_gib: float, bench: MeshBenchPlan,
                   device: str = "cpu", dummy: bool = False, engine_process: bool = True
                   ) -> dict[str, Any]:
    """What mutual TLS inside the mesh costs: the same load through the mesh without it
    and with it, in the order off, on, on, off (so a drift of the shared machine over the
    run weighs on both alike); throughput and latencies at the top concurrency, summed
    over the two runs of each, and the mesh's CPU per token apart from the engine's."""
    top = str(max(bench.concurrency))
    runs: dict[str, list[tuple[dict[str, dict[str, float]], dict[str, float]]]] = {
        "plaintext": [], "mtls": []}
    for mtls in (False, True, True, False):
        levels, use = through_mesh(model, dtype, kv_cache_gib, bench, device=device,
                                   dummy=dummy, engine_process=engine_process, mtls=mtls)
        runs["mtls" if mtls else "plaintext"].append((levels, use.per_token))

    def side(name: str) -> dict[str, Any]:
        tops = [levels[top] for levels, _ in runs[name]]
        return {"tokens_per_s": [lv["tokens_per_s"] for lv in tops],
                "tpot_ms_p50": [lv.get("tpot_ms_p50") for lv in tops],
                "ttft_ms_p50": [lv["ttft_ms_p50"] for lv in tops],
                "one_stream_tokens_per_s": [levels["1"]["tokens_per_s"]
                                            for levels, _ in runs[name] if "1" in levels],
                # Every process but the client's: the engine's share is alike in both.
                "cpu_ms_per_token": [round(sum(ms for p, ms in cpu.items() if p != "client"),
                                           4) for _, cpu in runs[name]]}

    plain, tls = side("plaintext"), side("mtls")
    return {"model": model, "dtype": dtype, "device": device, "concurrency": int(top),
            "output_tokens": bench.output_len, "order": "plaintext, mtls, mtls, plaintext",
            "plaintext": plain, "mtls": tls,
            # Throughput with mutual TLS over without, at the top concurrency.
            "throughput_ratio": round(sum(tls["tokens_per_s"])
                                      / sum(plain["tokens_per_s"]), 3),
            "target_throughput_ratio": TARGET_MTLS_THROUGHPUT_RATIO}
