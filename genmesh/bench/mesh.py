"""`genmesh bench mesh`: what the mesh adds to a generation, measured in one run.

The same chat prompts run twice: first against the engine in this process (the floor),
then through the whole mesh started by the launcher (Envoy edge → frontend → tokenizer
→ Envoy mesh → worker, with detokenization through the tokenizer's bidi stream). Both
see identical prompts in the same order, at 1 and 32 concurrent streams. Reported:
time to first token and per-token latency (gap between consecutive tokens) p50/p99,
and the difference, which is the mesh's overhead.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from genmesh.client import AsyncClient
from genmesh.launcher.plan import PORT_FIELDS, MeshConfig, plan
from genmesh.launcher.ports import free_ports
from genmesh.launcher.supervisor import Supervisor
from genmesh.models.chat_template import ChatMessage, ChatTemplate, load_chat_template
from services.worker.engine.async_engine import AsyncEngine
from services.worker.engine.config import EngineConfig
from services.worker.engine.params import SamplingParams

TARGET_ADDED_TTFT_MS = 5.0
TARGET_ADDED_PER_TOKEN_MS = 0.5


@dataclass(frozen=True, slots=True)
class MeshBenchPlan:
    concurrency: tuple[int, ...]
    rounds: dict[int, int]  # rounds of `concurrency` simultaneous streams, per level
    output_len: int  # tokens per stream (ignore_eos, so every stream is this long)


FULL = MeshBenchPlan(concurrency=(1, 32), rounds={1: 12, 32: 3}, output_len=64)
QUICK = MeshBenchPlan(concurrency=(1, 32), rounds={1: 4, 32: 1}, output_len=16)


@dataclass(frozen=True, slots=True)
class StreamTiming:
    ttft_s: float
    gaps_s: list[float]  # between consecutive token arrivals


def questions(n: int, offset: int) -> list[str]:
    topics = ["rivers", "prime numbers", "volcanoes", "bread", "chess", "the moon", "rain",
              "bees", "glass", "magnets", "clocks", "maps"]
    return [f"Question {offset + i}: tell me one fact about {topics[(offset + i) % len(topics)]}."
            for i in range(n)]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(timings: list[StreamTiming]) -> dict[str, float]:
    ttfts = [t.ttft_s * 1e3 for t in timings]
    gaps = [g * 1e3 for t in timings for g in t.gaps_s]
    return {"ttft_ms_p50": round(statistics.median(ttfts), 3),
            "ttft_ms_p99": round(_pct(ttfts, 0.99), 3),
            "per_token_ms_p50": round(statistics.median(gaps), 3),
            "per_token_ms_p99": round(_pct(gaps, 0.99), 3),
            "num_streams": len(timings), "num_gaps": len(gaps)}


async def _timed(stream: Any, has_token: Any) -> StreamTiming:
    t0 = time.perf_counter()
    arrivals = []
    async for item in stream:
        if has_token(item):
            arrivals.append(time.perf_counter())
    return StreamTiming(arrivals[0] - t0, [b - a for a, b in itertools.pairwise(arrivals)])


async def _levels(run_one: Any, bench: MeshBenchPlan) -> dict[str, dict[str, float]]:
    """Warm up once, then every level: rounds of ``c`` simultaneous streams."""
    await asyncio.gather(*(run_one(q) for q in questions(4, offset=10_000)))
    out, offset = {}, 0
    for c in bench.concurrency:
        timings: list[StreamTiming] = []
        for _ in range(bench.rounds[c]):
            timings += await asyncio.gather(*(run_one(q) for q in questions(c, offset)))
            offset += c
        out[str(c)] = summarize(timings)
    return out


def in_process(model_dir: Path, dtype: str, kv_cache_gib: float, bench: MeshBenchPlan
               ) -> dict[str, dict[str, float]]:
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    source = load_chat_template(model_dir)
    assert source is not None, "the benchmark model needs a chat template"
    template = ChatTemplate(source)
    params = SamplingParams(max_tokens=bench.output_len, ignore_eos=True)
    engine = AsyncEngine(EngineConfig(model=str(model_dir), dtype=dtype,
                                      kv_cache_memory_gib=kv_cache_gib))

    async def run_one(question: str) -> StreamTiming:
        # What the tokenizer service does for a chat: render the template, then encode.
        text = template.render([ChatMessage("user", question)])
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        return await _timed(engine.submit(ids, params), lambda d: bool(d.new_token_ids))

    try:
        return asyncio.run(_levels(run_one, bench))
    finally:
        engine.shutdown()


def through_mesh(model: str, dtype: str, kv_cache_gib: float, bench: MeshBenchPlan
                 ) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="genmesh-bench-") as run_dir:
        ports: dict[str, Any] = dict(zip(PORT_FIELDS, free_ports(len(PORT_FIELDS)),
                                         strict=True))
        config = MeshConfig(**ports, model=model, dtype=dtype, kv_cache_gib=kv_cache_gib,
                            with_redis=False, run_dir=Path(run_dir), log_level="WARNING")
        supervisor = Supervisor(plan(config), run_dir=config.run_dir)
        supervisor.start()
        try:
            supervisor.wait_ready(timeout_s=300)
            return asyncio.run(_mesh_levels(config.edge_address, bench))
        finally:
            supervisor.stop()


async def _mesh_levels(address: str, bench: MeshBenchPlan) -> dict[str, dict[str, float]]:
    async with AsyncClient(address, timeout_s=300) as client:
        async def run_one(question: str) -> StreamTiming:
            stream = client.generate_stream(
                messages=[{"role": "user", "content": question}],
                max_tokens=bench.output_len, ignore_eos=True)
            return await _timed(stream, lambda chunk: bool(chunk.text))

        return await _levels(run_one, bench)


def run_mesh_bench(model_dir: Path, *, model: str, dtype: str, kv_cache_gib: float,
                   bench: MeshBenchPlan) -> dict[str, Any]:
    direct = in_process(model_dir, dtype, kv_cache_gib, bench)
    meshed = through_mesh(model, dtype, kv_cache_gib, bench)
    added = {c: {k: round(meshed[c][k] - direct[c][k], 3)
                 for k in ("ttft_ms_p50", "ttft_ms_p99", "per_token_ms_p50",
                           "per_token_ms_p99")} for c in direct}
    top = str(max(bench.concurrency))
    return {
        "model": model, "dtype": dtype, "output_tokens": bench.output_len,
        "path": "client → Envoy edge → frontend → tokenizer (template, bidi detokenize) "
                "→ Envoy mesh → worker",
        "in_process": direct, "mesh": meshed, "added": added,
        "added_ttft_ms_p50": added[top]["ttft_ms_p50"],
        "added_per_token_ms_p50": added[top]["per_token_ms_p50"],
        "targets": {"added_ttft_ms_p50": TARGET_ADDED_TTFT_MS,
                    "added_per_token_ms_p50": TARGET_ADDED_PER_TOKEN_MS},
    }
