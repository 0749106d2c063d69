"""Helpers for engine tests that run the real default model."""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.worker.engine.async_engine import AsyncEngine
from services.worker.engine.config import EngineConfig
from services.worker.engine.core import EngineCore
from services.worker.engine.outputs import Delta
from services.worker.engine.params import SamplingParams

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "In 1969, astronauts first walked on the surface of the Moon.",
    "A binary search halves the search interval at every step.",
    "Rivers carry sediment from mountains down to the sea.",
    "The violin has four strings tuned in perfect fifths.",
]


def varied_texts(n: int) -> list[str]:
    """n prompts of growing length (a few tokens up to a few hundred)."""
    texts = []
    for i in range(n):
        body = " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(1 + 3 * i))
        texts.append(f"Question {i}: summarize this. {body}\nAnswer:")
    return texts


def engine(model_dir: Path, **overrides: object) -> AsyncEngine:
    options: dict[str, object] = {"model": str(model_dir), "dtype": "float32"}
    options.update(overrides)
    return AsyncEngine(EngineConfig(**options))  # type: ignore[arg-type]


async def collect(stream) -> tuple[list[int], Delta]:
    tokens: list[int] = []
    last = None
    async for delta in stream:
        tokens.extend(delta.new_token_ids)
        last = delta
    assert last is not None and last.finished
    return tokens, last


def run_all(eng: AsyncEngine, prompts: list[list[int]], params: SamplingParams, *,
            stagger_s: float = 0.0, salts: list[str] | None = None
            ) -> list[tuple[list[int], Delta]]:
    """Submit every prompt (the i-th after i * stagger_s seconds) and gather outputs."""

    async def one(i: int, prompt: list[int]) -> tuple[list[int], Delta]:
        await asyncio.sleep(i * stagger_s)
        salt = salts[i] if salts else ""
        return await collect(eng.submit(prompt, params, cache_salt=salt))

    async def main() -> list[tuple[list[int], Delta]]:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    return asyncio.run(main())


def tiny_core(**overrides: object) -> EngineCore:
    """An EngineCore on the tiny-llama preset (random weights, fp32, a 64-block pool of
    4-token blocks), stepped by hand."""
    options: dict[str, object] = {
        "model": "tiny-llama", "load_format": "dummy", "dtype": "float32",
        "num_kv_blocks": 64, "block_size": 4, "max_num_seqs": 8,
    }
    options.update(overrides)
    return EngineCore(EngineConfig(**options))  # type: ignore[arg-type]


def run_core(engine: EngineCore, requests: dict[str, tuple[list[int], SamplingParams]], *,
             abort_after: dict[str, int] | None = None) -> dict[str, list[Delta]]:
    """Step until every request is done; their deltas. ``abort_after[rid] = n`` aborts
    rid once it has n tokens."""
    for rid, (prompt, params) in requests.items():
        engine.add(engine.make_request(rid, prompt, params))
    out: dict[str, list[Delta]] = {rid: [] for rid in requests}
    for _ in range(1000):
        if not engine.has_work():
            return out
        for d in engine.step():
            out[d.request_id].append(d)
        for rid, n in (abort_after or {}).items():
            got = sum(len(d.new_token_ids) for d in out[rid])
            if got >= n and not (out[rid] and out[rid][-1].finished):
                final = engine.abort(rid)
                assert final is not None
                out[rid].append(final)
    raise AssertionError("the engine did not finish")
