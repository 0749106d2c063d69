"""`genmesh bench engine`: the native engine against HF transformers, in one run.

Everything is measured on the same prompts in the same process, and reported as
ratios: absolute times on shared machines are noisy, ratios within one run are not.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from services.worker.engine.async_engine import AsyncEngine
from services.worker.engine.config import EngineConfig
from services.worker.engine.params import SamplingParams


@dataclass(frozen=True, slots=True)
class BenchPlan:
    concurrency: tuple[int, ...]  # engine throughput levels
    num_requests_min: int  # at least this many requests per level (and >= the level)
    min_prompt_len: int
    max_prompt_len: int
    output_len: int
    hf_one_at_a_time: int  # requests for the one-at-a-time baseline
    hf_batch_size: int  # static batch size of the padded baseline
    prefix_len: int  # cached-prefix TTFT test
    suffix_len: int
    ttft_repeats: int
    single_stream_tokens: int


FULL = BenchPlan(concurrency=(1, 8, 32, 64), num_requests_min=16, min_prompt_len=20,
                 max_prompt_len=500, output_len=128, hf_one_at_a_time=6, hf_batch_size=32,
                 prefix_len=1024, suffix_len=16, ttft_repeats=5, single_stream_tokens=128)
QUICK = BenchPlan(concurrency=(1, 8, 32, 64), num_requests_min=8, min_prompt_len=20,
                  max_prompt_len=500, output_len=16, hf_one_at_a_time=2, hf_batch_size=32,
                  prefix_len=1024, suffix_len=16, ttft_repeats=2, single_stream_tokens=32)


def make_prompts(n: int, *, vocab_size: int, min_len: int, max_len: int,
                 seed: int = 0) -> list[list[int]]:
    """Random token-id prompts of lengths spread over [min_len, max_len]; no two share
    a first block, so nothing is served from the prefix cache by accident."""
    rng = random.Random(seed)
    lo = min(1000, vocab_size // 4)  # skip the special tokens at the start of the vocab
    lengths = [round(min_len + (max_len - min_len) * i / max(n - 1, 1)) for i in range(n)]
    rng.shuffle(lengths)
    return [[rng.randrange(lo, vocab_size) for _ in range(length)] for length in lengths]


def measure_read_bandwidth(device: torch.device, *, num_bytes: int = 512 * 2**20) -> float:
    """Bytes/s of a streaming read (a large fp32 sum), best of a few runs."""
    x = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return num_bytes / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the engine ------------------------------------------------------------------------


async def _run_requests(engine: AsyncEngine, prompts: list[list[int]], *, concurrency: int,
                        output_len: int) -> tuple[int, float]:
    """Keep ``concurrency`` requests in flight until all prompts are served.
    Returns (output tokens, seconds)."""
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    pending = list(prompts)
    total = 0

    async def client() -> None:
        nonlocal total
        while pending:
            prompt = pending.pop(0)
            async for delta in engine.submit(prompt, params):
                total += len(delta.new_token_ids)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return total, time.perf_counter() - t0


async def _ttft(engine: AsyncEngine, prompt: list[int]) -> float:
    t0 = time.perf_counter()
    async for _ in engine.submit(prompt, SamplingParams(max_tokens=1, ignore_eos=True)):
        return time.perf_counter() - t0
    raise RuntimeError("no output")


async def _engine_suite(engine: AsyncEngine, plan: BenchPlan, prompts: list[list[int]],
                        vocab_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {"throughput": {}}
    # Warm up kernels and allocator once.
    await _run_requests(engine, prompts[:2], concurrency=2, output_len=4)
    for c in plan.concurrency:
        engine.reset_prefix_cache()
        reqs = prompts[: max(c, plan.num_requests_min)]
        tokens, seconds = await _run_requests(engine, reqs, concurrency=c,
                                              output_len=plan.output_len)
        stats = engine.stats()
        out["throughput"][str(c)] = {
            "requests": len(reqs), "output_tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2),
            "mean_batch_size": round(stats.mean_batch_size, 1),
            "mean_step_ms": round(stats.mean_step_ms, 2),
        }

    # TTFT with a cached 1,024-token prefix vs cold: each cold prefix is new.
    rng = random.Random(1)
    cold, warm = [], []
    for r in range(plan.ttft_repeats):
        prefix = make_prompts(1, vocab_size=vocab_size, min_len=plan.prefix_len,
                              max_len=plan.prefix_len, seed=100 + r)[0]

        def suffix() -> list[int]:
            return [rng.randrange(1000, vocab_size) for _ in range(plan.suffix_len)]

        cold.append(await _ttft(engine, prefix + suffix()))
        warm.append(await _ttft(engine, prefix + suffix()))
    out["prefix_ttft"] = {
        "prefix_tokens": plan.prefix_len, "suffix_tokens": plan.suffix_len,
        "cold_ms_p50": round(statistics.median(cold) * 1e3, 2),
        "warm_ms_p50": round(statistics.median(warm) * 1e3, 2),
    }

    # Single-stream decode speed: time between the first and the last token.
    params = SamplingParams(max_tokens=plan.single_stream_tokens, ignore_eos=True)
    stamps = []
    async for _ in engine.submit(prompts[0][:32], params):
        stamps.append(time.perf_counter())
    out["single_stream"] = {
        "decode_tokens_per_s": round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 2),
    }
    return out


# -- HF transformers baselines ---------------------------------------------------------


def _hf_model(model_path: str, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    return model.to(device).eval()


@torch.inference_mode()
def _hf_generate(model: Any, prompts: list[list[int]], output_len: int, pad_id: int,
                 device: torch.device) -> tuple[int, float]:
    """One left-padded static batch. Returns (output tokens, seconds)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                         max_new_tokens=output_len, min_new_tokens=output_len,
                         pad_token_id=pad_id)
    _sync(device)
    seconds = time.perf_counter() - t0
    return (out.shape[1] - width) * len(prompts), seconds


def _hf_suite(model_path: str, plan: BenchPlan, prompts: list[list[int]], dtype: torch.dtype,
              device: torch.device) -> dict[str, Any]:
    model = _hf_model(model_path, dtype, device)
    pad_id = 0
    _hf_generate(model, [prompts[0][:8]], 2, pad_id, device)  # warm-up
    tokens = seconds = 0.0
    for p in prompts[: plan.hf_one_at_a_time]:
        t, s = _hf_generate(model, [p], plan.output_len, pad_id, device)
        tokens, seconds = tokens + t, seconds + s
    one = tokens / seconds
    batch = prompts[: plan.hf_batch_size]
    bt, bs = _hf_generate(model, batch, plan.output_len, pad_id, device)
    return {
        "one_at_a_time": {"requests": plan.hf_one_at_a_time, "tokens_per_s": round(one, 2)},
        "static_batch": {"batch_size": len(batch), "output_tokens": bt,
                         "seconds": round(bs, 3), "tokens_per_s": round(bt / bs, 2)},
    }


# -- the whole run ---------------------------------------------------------------------


def run_engine_bench(config: EngineConfig, plan: BenchPlan, *, with_hf: bool = True
                     ) -> dict[str, Any]:
    engine = AsyncEngine(config)
    try:
        cfg = engine.core.model_cfg
        n = max(max(plan.concurrency), plan.num_requests_min, plan.hf_batch_size)
        prompts = make_prompts(n, vocab_size=cfg.vocab_size, min_len=plan.min_prompt_len,
                               max_len=plan.max_prompt_len)
        result: dict[str, Any] = {
            "model": config.model, "dtype": config.dtype, "device": config.device,
            "threads": torch.get_num_threads(),
            "workload": {"prompt_tokens": [plan.min_prompt_len, plan.max_prompt_len],
                         "output_tokens": plan.output_len},
            "engine": asyncio.run(_engine_suite(engine, plan, prompts, cfg.vocab_size)),
        }
        weight_bytes = engine.core.runner.weight_bytes_per_token
    finally:
        engine.shutdown()
    bandwidth = measure_read_bandwidth(torch.device(config.device))
    roofline = bandwidth / weight_bytes
    result["roofline"] = {"read_bandwidth_gb_s": round(bandwidth / 1e9, 2),
                          "weight_bytes": weight_bytes,
                          "decode_tokens_per_s": round(roofline, 2)}
    eng = result["engine"]
    top = str(max(plan.concurrency))
    ratios: dict[str, float | None] = {
        "warm_prefix_ttft_speedup": round(
            eng["prefix_ttft"]["cold_ms_p50"] / eng["prefix_ttft"]["warm_ms_p50"], 2),
        "single_stream_roofline_fraction": round(
            eng["single_stream"]["decode_tokens_per_s"] / roofline, 3),
        "vs_hf_one_at_a_time": None,
        "vs_hf_static_batch": None,
    }
    if with_hf and config.load_format != "dummy":
        hf = _hf_suite(config.model, plan, prompts, config.torch_dtype,
                       torch.device(config.device))
        result["hf"] = hf
        top_tps = eng["throughput"][top]["tokens_per_s"]
        ratios["vs_hf_one_at_a_time"] = round(top_tps / hf["one_at_a_time"]["tokens_per_s"], 2)
        ratios["vs_hf_static_batch"] = round(top_tps / hf["static_batch"]["tokens_per_s"], 2)
    result["ratios"] = ratios
    return result
