"""`genmesh bench engine`: the native engine against HF transformers, in one run.

Everything is measured on the same prompts in the same process, and reported as
ratios: absolute times on shared machines are noisy, ratios within one run are not.
With dummy weights the HF baseline is built from the same shape (random weights, same
device), so every ratio exists for a preset too.
"""

from __future__ import annotations

import asyncio
import gc
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from genmesh.bench.step_profile import profile_decode_steps, sync
from services.worker.engine.async_engine import AsyncEngine
from services.worker.engine.config import EngineConfig
from services.worker.engine.model.config import ModelConfig
from services.worker.engine.params import SamplingParams

# EngineStats fields of the step's phases (ms, means over the recent window); read with
# getattr: an engine without one reports None.
STEP_PHASE_FIELDS = ("mean_prepare_ms", "mean_forward_ms", "mean_sample_ms")


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
    # Warm-up requests (4 output tokens each) before the first level; as many as the top
    # level on a GPU, so kernels for the largest batch are compiled before timing.
    warmup_requests: int = 2


FULL = BenchPlan(concurrency=(1, 8, 32, 64), num_requests_min=16, min_prompt_len=20,
                 max_prompt_len=500, output_len=128, hf_one_at_a_time=6, hf_batch_size=32,
                 prefix_len=1024, suffix_len=16, ttft_repeats=5, single_stream_tokens=128)
QUICK = BenchPlan(concurrency=(1, 8, 32, 64), num_requests_min=8, min_prompt_len=20,
                  max_prompt_len=500, output_len=16, hf_one_at_a_time=2, hf_batch_size=32,
                  prefix_len=1024, suffix_len=16, ttft_repeats=2, single_stream_tokens=32)
# One H200: the Llama-3-8B and SmolLM2 shapes at 1, 64 and 256 streams; HF's static
# batch is as large as the top level. Sized to fit a device call (see scripts/device).
GPU = BenchPlan(concurrency=(1, 64, 256), num_requests_min=4, min_prompt_len=20,
                max_prompt_len=500, output_len=128, hf_one_at_a_time=2, hf_batch_size=256,
                prefix_len=1024, suffix_len=16, ttft_repeats=3, single_stream_tokens=128,
                warmup_requests=256)
PLANS = {"quick": QUICK, "full": FULL, "gpu": GPU}


def parse_concurrency(text: str) -> tuple[int, ...]:
    """``"1,64,256"`` -> ``(1, 64, 256)``: positive, distinct, sorted."""
    try:
        levels = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise ValueError(f"--concurrency wants comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency wants positive integers, got {text!r}")
    return tuple(sorted(levels))


def make_plan(name: str = "full", *, concurrency: str | Sequence[int] | None = None,
              hf_batch_size: int | None = None) -> BenchPlan:
    """A named plan, optionally with other concurrency levels; the HF static batch then
    follows the top level (unless given), so that ratio compares equal batch sizes."""
    if name not in PLANS:
        raise ValueError(f"unknown plan {name!r}; plans: {', '.join(sorted(PLANS))}")
    plan = PLANS[name]
    if concurrency is not None:
        levels = (parse_concurrency(concurrency) if isinstance(concurrency, str)
                  else parse_concurrency(",".join(map(str, concurrency))))
        plan = replace(plan, concurrency=levels, hf_batch_size=max(levels))
    if hf_batch_size is not None:
        if hf_batch_size < 1:
            raise ValueError(f"the HF batch size must be >= 1, got {hf_batch_size}")
        plan = replace(plan, hf_batch_size=hf_batch_size)
    return plan


def make_prompts(n: int, *, vocab_size: int, min_len: int, max_len: int,
                 seed: int = 0) -> list[list[int]]:
    """Random token-id prompts of lengths spread over [min_len, max_len]; no two share
    a first block, so nothing is served from the prefix cache by accident."""
    rng = random.Random(seed)
    lo = _first_plain_token(vocab_size)
    lengths = [round(min_len + (max_len - min_len) * i / max(n - 1, 1)) for i in range(n)]
    rng.shuffle(lengths)
    return [[rng.randrange(lo, vocab_size) for _ in range(length)] for length in lengths]


def _first_plain_token(vocab_size: int) -> int:
    return min(1000, vocab_size // 4)  # skip the special tokens at the start of the vocab


def measure_read_bandwidth(device: torch.device, *, num_bytes: int = 512 * 2**20) -> float:
    """Bytes/s of a streaming read (a large fp32 sum), best of a few runs."""
    x = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return num_bytes / best


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


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


async def _engine_suite(engine: AsyncEngine, plan: BenchPlan, prompts: list[list[int]],
                        vocab_size: int, out: dict[str, Any],
                        checkpoint: Callable[[], None]) -> None:
    """Fill ``out`` stage by stage, calling ``checkpoint`` after each."""
    out["throughput"] = {}
    # Warm up kernels and allocator once.
    warmup = prompts[: plan.warmup_requests]
    await _run_requests(engine, warmup, concurrency=len(warmup), output_len=4)
    for c in plan.concurrency:
        engine.reset_prefix_cache()
        reqs = prompts[: max(c, plan.num_requests_min)]
        tokens, seconds = await _run_requests(engine, reqs, concurrency=c,
                                              output_len=plan.output_len)
        stats = engine.stats()
        level: dict[str, Any] = {
            "requests": len(reqs), "output_tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2),
            "mean_batch_size": round(stats.mean_batch_size, 1),
            "mean_step_ms": round(stats.mean_step_ms, 2),
        }
        # Where a step's time goes (host-side): input preparation, forward, sampling.
        level.update({name: _round(getattr(stats, name, None)) for name in STEP_PHASE_FIELDS})
        out["throughput"][str(c)] = level
        checkpoint()

    # TTFT with a cached 1,024-token prefix vs cold: each cold prefix is new.
    rng = random.Random(1)
    lo = _first_plain_token(vocab_size)
    cold, warm = [], []
    for r in range(plan.ttft_repeats):
        prefix = make_prompts(1, vocab_size=vocab_size, min_len=plan.prefix_len,
                              max_len=plan.prefix_len, seed=100 + r)[0]

        def suffix() -> list[int]:
            return [rng.randrange(lo, vocab_size) for _ in range(plan.suffix_len)]

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
    checkpoint()


def _step_profiles(engine: AsyncEngine, plan: BenchPlan) -> dict[str, Any]:
    """Profiled decode steps at each level the engine can batch (engine loop stopped)."""
    core, config = engine.core, engine.config
    context_len = (plan.min_prompt_len + plan.max_prompt_len) // 2
    out: dict[str, Any] = {}
    for c in plan.concurrency:
        if c > config.max_num_seqs:
            out[str(c)] = {"skipped": f"above max_num_seqs ({config.max_num_seqs})"}
            continue
        core.blocks.reset_prefix_cache()
        prompts = make_prompts(c, vocab_size=core.model_cfg.vocab_size, min_len=context_len,
                               max_len=context_len, seed=200 + c)
        out[str(c)] = profile_decode_steps(core, prompts).as_dict()
    return out


# -- HF transformers baselines ---------------------------------------------------------


def hf_config(cfg: ModelConfig, *, dtype: torch.dtype | None = None) -> Any:
    """The transformers config of the same shape (LlamaConfig, MistralConfig or
    Qwen2Config, by ``cfg.model_type``)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
        rope.setdefault("rope_type", rope.pop("type", "llama3"))
    eos = list(cfg.eos_token_ids)
    kwargs: dict[str, Any] = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "rope_parameters": rope,
        "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
    }
    if cfg.model_type == "llama":
        kwargs["attention_bias"] = cfg.qkv_bias
    elif cfg.model_type == "mistral":
        kwargs["sliding_window"] = cfg.sliding_window
    elif cfg.model_type == "qwen2":  # q/k/v biases always; head_dim is hidden / heads
        del kwargs["head_dim"]
        kwargs["use_sliding_window"] = False
    if dtype is not None:
        kwargs["dtype"] = dtype
    return CONFIG_MAPPING[cfg.model_type](**kwargs)


def _hf_model_from_config(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> Any:
    """Random weights of ``cfg``'s shape, created on ``device`` (an 8B model is never
    initialised on the host first)."""
    from transformers import AutoModelForCausalLM

    with device:
        model: Any = AutoModelForCausalLM.from_config(hf_config(cfg, dtype=dtype), dtype=dtype)
    return model.to(device).eval()


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
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                         max_new_tokens=output_len, min_new_tokens=output_len,
                         pad_token_id=pad_id)
    sync(device)
    seconds = time.perf_counter() - t0
    return (out.shape[1] - width) * len(prompts), seconds


def _hf_suite(model: Any, plan: BenchPlan, prompts: list[list[int]],
              device: torch.device) -> dict[str, Any]:
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


def run_engine_bench(config: EngineConfig, plan: BenchPlan, *, with_hf: bool = True,
                     profile: bool = True,
                     on_progress: Callable[[dict[str, Any]], None] | None = None
                     ) -> dict[str, Any]:
    """The whole benchmark. ``on_progress`` gets the result so far after each stage (a
    run cut short still leaves its numbers); ``profile`` adds profiled decode steps at
    each level, on CUDA only. A failed profile or HF baseline is reported in its
    section and leaves its ratios None; the rest of the run stands."""
    device = torch.device(config.device)
    result: dict[str, Any] = {
        "model": config.model, "dtype": config.dtype, "device": config.device,
        "threads": torch.get_num_threads(),
        "workload": {"prompt_tokens": [plan.min_prompt_len, plan.max_prompt_len],
                     "output_tokens": plan.output_len},
        "engine_config": {"max_num_seqs": config.max_num_seqs,
                          "max_num_batched_tokens": config.max_num_batched_tokens,
                          "kv_cache_memory_gib": config.kv_cache_memory_gib,
                          "load_format": config.load_format},
    }

    def checkpoint() -> None:
        if on_progress is not None:
            on_progress(result)

    engine = AsyncEngine(config)
    try:
        cfg = engine.core.model_cfg
        n = max(max(plan.concurrency), plan.num_requests_min, plan.hf_batch_size,
                plan.warmup_requests)
        prompts = make_prompts(n, vocab_size=cfg.vocab_size, min_len=plan.min_prompt_len,
                               max_len=plan.max_prompt_len)
        result["engine"] = {}
        asyncio.run(_engine_suite(engine, plan, prompts, cfg.vocab_size, result["engine"],
                                  checkpoint))
        weight_bytes = engine.core.runner.weight_bytes_per_token
    finally:
        engine.shutdown()
    if profile and device.type == "cuda":
        try:  # the loop thread is stopped: the core is this thread's alone now
            result["step_profile"] = _step_profiles(engine, plan)
        except Exception as exc:
            result["step_profile"] = {"error": f"{type(exc).__name__}: {exc}"}
        checkpoint()
    del engine  # the engine's weights and KV pool go before HF's model comes
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    bandwidth = measure_read_bandwidth(device)
    roofline = bandwidth / weight_bytes
    result["roofline"] = {"read_bandwidth_gb_s": round(bandwidth / 1e9, 2),
                          "weight_bytes": weight_bytes,
                          "decode_tokens_per_s": round(roofline, 2)}
    eng = result["engine"]
    throughput = eng["throughput"]
    top_tps = throughput[str(max(plan.concurrency))]["tokens_per_s"]
    ratios: dict[str, float | None] = {
        "warm_prefix_ttft_speedup": round(
            eng["prefix_ttft"]["cold_ms_p50"] / eng["prefix_ttft"]["warm_ms_p50"], 2),
        "single_stream_roofline_fraction": round(
            eng["single_stream"]["decode_tokens_per_s"] / roofline, 3),
        # the top level's throughput over HF serving one request at a time
        "vs_hf_one_at_a_time": None,
        # the top level's throughput over one HF static batch (hf_batch_size requests)
        "vs_hf_static_batch": None,
        # one stream against one stream: the engine at concurrency 1 over HF one at a time
        "single_stream_vs_hf_one_at_a_time": None,
    }
    result["ratios"] = ratios
    checkpoint()
    if not with_hf:
        return result
    try:
        if config.load_format == "dummy":
            model = _hf_model_from_config(cfg, config.torch_dtype, device)
        else:
            model = _hf_model(config.model, config.torch_dtype, device)
        hf = _hf_suite(model, plan, prompts, device)
    except Exception as exc:
        result["hf"] = {"error": f"{type(exc).__name__}: {exc}"}
        return result
    result["hf"] = hf
    hf_one = hf["one_at_a_time"]["tokens_per_s"]
    ratios["vs_hf_one_at_a_time"] = round(top_tps / hf_one, 2)
    ratios["vs_hf_static_batch"] = round(top_tps / hf["static_batch"]["tokens_per_s"], 2)
    if "1" in throughput:
        ratios["single_stream_vs_hf_one_at_a_time"] = round(
            throughput["1"]["tokens_per_s"] / hf_one, 2)
    checkpoint()
    return result
