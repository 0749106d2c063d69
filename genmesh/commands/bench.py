"""`genmesh bench engine`: throughput, prefix-cache TTFT and roofline, as JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from genmesh.core.models.store import ModelStore, default_store_root
from services.worker.engine.config import EngineConfig

# Engine sizes for the bench when not given: the CPU ones are the dev machines'; the GPU
# ones hold the gpu plan's 256 streams of up to 628 tokens for Llama-3-8B (~21 GB of KV).
_CPU_KV_GIB, _GPU_KV_GIB = 2.0, 32.0
_CPU_BATCHED_TOKENS, _GPU_BATCHED_TOKENS = 512, 4096


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (print JSON)")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    e = bsub.add_parser("engine", help="the native engine vs HF transformers")
    e.add_argument("--plan", choices=("quick", "full", "gpu"), default=None,
                   help="workload: full (default), quick (under a minute on CPU) or gpu "
                        "(concurrency 1, 64, 256; HF static batch of 256)")
    e.add_argument("--quick", action="store_true", help="the same as --plan quick")
    e.add_argument("--concurrency", metavar="N,N,...",
                   help="engine levels instead of the plan's, e.g. 1,64,256 (the HF static "
                        "batch then follows the top level)")
    e.add_argument("--hf-batch-size", type=int, help="HF static batch size (default: the plan's)")
    e.add_argument("--model", default="smollm2-135m-instruct",
                   help="store name, HF folder, or with --dummy a preset (e.g. llama-3-8b)")
    e.add_argument("--dummy", action="store_true",
                   help="random weights of the model's shape (HF's baseline too)")
    e.add_argument("--dtype", default="bfloat16")
    e.add_argument("--device", default="cpu")
    e.add_argument("--kv-cache-gib", type=float, default=None,
                   help=f"KV pool size (default: {_CPU_KV_GIB} on CPU, {_GPU_KV_GIB} on a GPU)")
    e.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help=f"token budget per step (default: {_CPU_BATCHED_TOKENS} on CPU, "
                        f"{_GPU_BATCHED_TOKENS} on a GPU)")
    e.add_argument("--max-num-seqs", type=int, default=None,
                   help="most requests running at once (default: max(128, top level))")
    e.add_argument("--no-hf", action="store_true", help="skip the HF transformers baselines")
    e.add_argument("--no-profile", action="store_true",
                   help="skip the profiled decode steps (CUDA only)")
    e.add_argument("--variants", metavar="V,V,...", default=None,
                   help="quantizations (int8, int4; with a quality section, genmesh/bench/"
                        "variants.py) and speculation modes (ngram, draft: genmesh/bench/"
                        "speculation.py) measured beside bf16 in the same run; 'none' for "
                        "none (default: all four with the full plan on a CPU, else none)")
    e.add_argument("--output", help="also write the JSON to this file (updated after each "
                                    "stage, with \"partial\": true until the run ends)")
    e.set_defaults(func=_engine)
    m = bsub.add_parser("mesh", help="latency the mesh adds over the in-process engine")
    m.add_argument("--quick", action="store_true", help="a small run (under a minute)")
    m.add_argument("--model", default="smollm2-135m-instruct", help="a model in the store")
    m.add_argument("--dtype", default="bfloat16")
    m.add_argument("--kv-cache-gib", type=float, default=1.0)
    m.add_argument("--device", default="cpu", help="the worker's device (e.g. cuda)")
    m.add_argument("--dummy", action="store_true",
                   help="random weights of the model's shape in the worker (no weights needed)")
    m.add_argument("--output-len", type=int, default=0,
                   help="tokens per stream (default: the plan's, 64)")
    m.add_argument("--engine-thread", action="store_true",
                   help="the worker's engine core on a thread (default: its own process)")
    m.add_argument("--mtls", action="store_true",
                   help="instead: the mesh without and with mutual TLS inside, compared "
                        "(off, on, on, off; no in-process run)")
    m.add_argument("--output", help="also write the JSON to this file")
    m.set_defaults(func=_mesh)
    t = bsub.add_parser("tracing", help="what tracing (every span exported) costs the mesh")
    t.add_argument("--quick", action="store_true", help="a small run (a minute or two)")
    t.add_argument("--model", default="smollm2-135m-instruct", help="a model in the store")
    t.add_argument("--dtype", default="bfloat16")
    t.add_argument("--kv-cache-gib", type=float, default=1.0)
    t.add_argument("--output", help="also write the JSON to this file")
    t.set_defaults(func=_tracing)
    s = bsub.add_parser("safety", help="prompt-check latency and per-chunk moderation cost")
    s.add_argument("--quick", action="store_true", help="a small run (under a minute)")
    s.add_argument("--output", help="also write the JSON to this file")
    s.set_defaults(func=_safety)
    _register_serve(bsub)


def _engine(args: argparse.Namespace) -> int:
    from genmesh.bench.engine import make_plan, run_engine_bench

    plan_name = "quick" if args.quick else (args.plan or "full")
    plan = make_plan(plan_name,
                     concurrency=args.concurrency, hf_batch_size=args.hf_batch_size)
    model = args.model
    if not args.dummy:
        model = str(ModelStore(default_store_root()).ensure(args.model))
    on_gpu = args.device.startswith("cuda")
    kv_gib = args.kv_cache_gib if args.kv_cache_gib is not None else (
        _GPU_KV_GIB if on_gpu else _CPU_KV_GIB)
    batched = args.max_num_batched_tokens if args.max_num_batched_tokens is not None else (
        _GPU_BATCHED_TOKENS if on_gpu else _CPU_BATCHED_TOKENS)
    config = EngineConfig(model=model, dtype=args.dtype, device=args.device,
                          load_format="dummy" if args.dummy else "auto",
                          kv_cache_memory_gib=kv_gib, max_num_batched_tokens=batched,
                          max_num_seqs=args.max_num_seqs or max(128, max(plan.concurrency)))

    def on_progress(partial: dict) -> None:
        if args.output:
            _write_json({**partial, "partial": True}, args.output)

    result = run_engine_bench(config, plan, with_hf=not args.no_hf,
                              profile=not args.no_profile, on_progress=on_progress)
    variants = args.variants
    if variants is None:
        variants = "int8,int4,ngram,draft" if plan_name == "full" and not on_gpu else "none"
    names = [v for v in variants.split(",") if v and v != "none"]
    unknown = sorted(set(names) - {"int8", "int4", "ngram", "draft"})
    if unknown:
        print(f"error: unknown variants {unknown}: choose from int8, int4, ngram, draft",
              file=sys.stderr)
        return 2
    quantized = [n for n in names if n in ("int8", "int4")]
    speculative = [n for n in names if n in ("ngram", "draft")]
    variant_config = dataclasses.replace(config, max_num_seqs=max(64, config.max_num_seqs))
    if quantized and not args.dummy:
        from genmesh.bench.variants import run_variants

        def on_variant(partial: dict) -> None:
            result["variants"] = partial
            on_progress(result)

        result["variants"] = run_variants(variant_config, quantized, on_progress=on_variant)
    if speculative and not args.dummy:
        from genmesh.bench.speculation import run_speculation

        def on_speculation(partial: dict) -> None:
            result["speculation"] = partial
            on_progress(result)

        result["speculation"] = run_speculation(variant_config, speculative,
                                                on_progress=on_speculation)
    print(json.dumps(result, indent=2))
    if args.output:
        _write_json(result, args.output)
    return 0


def _mesh(args: argparse.Namespace) -> int:
    from genmesh.bench.mesh import FULL, QUICK, QUICK_MTLS, run_mesh_bench, run_mtls_bench

    model_dir = ModelStore(default_store_root()).ensure(args.model)
    bench = (QUICK_MTLS if args.mtls else QUICK) if args.quick else FULL
    if args.output_len:
        bench = dataclasses.replace(bench, output_len=args.output_len)
    if args.mtls:
        return _print(run_mtls_bench(model=args.model, dtype=args.dtype,
                                     kv_cache_gib=args.kv_cache_gib, bench=bench,
                                     device=args.device, dummy=args.dummy,
                                     engine_process=not args.engine_thread), args.output)
    result = run_mesh_bench(model_dir, model=args.model, dtype=args.dtype,
                            kv_cache_gib=args.kv_cache_gib, bench=bench,
                            device=args.device, dummy=args.dummy,
                            engine_process=not args.engine_thread)
    return _print(result, args.output)


def _tracing(args: argparse.Namespace) -> int:
    from genmesh.bench.mesh import FULL, QUICK
    from genmesh.bench.tracing import run_tracing_bench

    ModelStore(default_store_root()).ensure(args.model)
    result = run_tracing_bench(model=args.model, dtype=args.dtype,
                               kv_cache_gib=args.kv_cache_gib,
                               bench=QUICK if args.quick else FULL)
    return _print(result, args.output)


def _safety(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from genmesh.bench.safety import FULL, QUICK, run_safety_bench

    with tempfile.TemporaryDirectory() as tmp:
        result = run_safety_bench(QUICK if args.quick else FULL, tmp=Path(tmp))
    return _print(result, args.output)



def _register_serve(bsub: argparse._SubParsersAction) -> None:
    v = bsub.add_parser("serve", help="load sweeps against a running mesh (and the seed "
                                      "FastAPI pattern): latency, throughput, goodput")
    where = v.add_mutually_exclusive_group()
    where.add_argument("--target", metavar="HOST:PORT",
                       help="the mesh's edge (default: genmesh up's, 127.0.0.1:8080)")
    where.add_argument("--start-mesh", action="store_true",
                       help="start the mesh as genmesh up does (first version only), and "
                            "stop it after")
    v.add_argument("--api-key", help="the tenant's key (default: $GENMESH_API_KEY, else the "
                                     "local mesh's dev key)")
    v.add_argument("--http", action="store_true",
                   help="also run the same load through the mesh's OpenAI-compatible HTTP "
                        "API (same edge), and report its goodput over the gRPC API's")
    v.add_argument("--baseline", choices=("seed-fastapi",),
                   help="also run the same load against this baseline (started here)")
    v.add_argument("--model", default="smollm2-135m-instruct",
                   help="a model in the store: the baseline loads it, a started mesh serves it")
    v.add_argument("--dtype", default="bfloat16",
                   help="the baseline's (and a started mesh's) dtype (genmesh up's v1 is "
                        "bfloat16)")
    v.add_argument("--kv-cache-gib", type=float, default=1.0, help="a started mesh's KV pool")
    v.add_argument("--workload", choices=("mixed", "chat"), default="mixed",
                   help="mixed: single-turn prompts of spread-out lengths; chat: multi-turn "
                        "conversations sharing a system prompt and their history")
    load = v.add_mutually_exclusive_group()
    load.add_argument("--concurrency", metavar="N,N,...",
                      help="fixed-concurrency levels: conversations in flight (default 1,4,8)")
    load.add_argument("--request-rate", metavar="R,R,...",
                      help="Poisson levels: conversations started per second (inf: all at once)")
    v.add_argument("--num-prompts", type=int, default=24,
                   help="requests per level (chat: conversations x turns)")
    v.add_argument("--num-turns", type=int, default=3, help="chat: user turns per conversation")
    v.add_argument("--min-input-words", type=int, default=16, help="mixed: shortest prompt")
    v.add_argument("--max-input-words", type=int, default=256, help="mixed: longest prompt")
    v.add_argument("--max-tokens", type=int, default=64,
                   help="output tokens of every request (EOS ignored, greedy)")
    v.add_argument("--slo-ttft-ms", type=float, default=1000.0,
                   help="goodput counts requests whose TTFT is at most this ...")
    v.add_argument("--slo-tpot-ms", type=float, default=100.0,
                   help="... and whose time per output token is at most this")
    v.add_argument("--seed", type=int, default=0, help="prompts and Poisson arrivals")
    v.add_argument("--duration-limit-s", type=float, default=120.0,
                   help="per level and target: requests still running then are cancelled")
    v.add_argument("--request-timeout-s", type=float, default=120.0)
    v.add_argument("--num-warmups", type=int, default=2,
                   help="unmeasured requests before each target's first level")
    v.add_argument("--output", help="also write the JSON to this file")
    v.add_argument("--plot-dir", help="write latency.png and goodput.png here")
    v.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import math
    from pathlib import Path

    from genmesh.bench.engine import parse_concurrency

    try:
        from genmesh.bench.serve import LoadLevel, ServeBenchConfig, run_serve_bench
    except ImportError as exc:  # httpx, fastapi, matplotlib: the dev extra
        print(f"genmesh: bench serve needs the dev extra (pip install -e '.[dev]'): {exc}",
              file=sys.stderr)
        return 2
    from genmesh.bench.serve_metrics import Slo
    from genmesh.bench.serve_workload import WorkloadSpec
    from genmesh.client.types import DEV_API_KEY

    try:
        if args.request_rate:
            bad = ValueError(f"--request-rate wants comma-separated positive numbers (or "
                             f"inf), got {args.request_rate!r}")
            try:
                rates = sorted({float(r) for r in args.request_rate.split(",") if r.strip()})
            except ValueError:
                raise bad from None
            if not rates or min(rates) <= 0 or any(math.isnan(r) for r in rates):
                raise bad
            levels = tuple(LoadLevel(request_rate=r) for r in rates)
        else:
            levels = tuple(LoadLevel(concurrency=c)
                           for c in parse_concurrency(args.concurrency or "1,4,8"))
        if min(args.num_prompts, args.num_turns, args.max_tokens, args.min_input_words) < 1:
            raise ValueError("--num-prompts, --num-turns, --max-tokens and "
                             "--min-input-words must be at least 1")
        if args.max_input_words < args.min_input_words:
            raise ValueError("--max-input-words must be at least --min-input-words")
    except ValueError as exc:
        print(f"genmesh: {exc}", file=sys.stderr)
        return 2
    config = ServeBenchConfig(
        levels=levels,
        workload=WorkloadSpec(args.workload, num_requests=args.num_prompts,
                              min_input_words=args.min_input_words,
                              max_input_words=args.max_input_words, num_turns=args.num_turns),
        max_tokens=args.max_tokens, slo=Slo(args.slo_ttft_ms, args.slo_tpot_ms),
        seed=args.seed, duration_limit_s=args.duration_limit_s,
        request_timeout_s=args.request_timeout_s, num_warmups=args.num_warmups,
        model=args.model, dtype=args.dtype)
    target = None if args.start_mesh else (args.target or "127.0.0.1:8080")
    api_key = args.api_key or os.environ.get("GENMESH_API_KEY") or DEV_API_KEY
    result = run_serve_bench(config, target=target, api_key=api_key, baseline=args.baseline,
                             kv_cache_gib=args.kv_cache_gib, http=args.http)
    if args.plot_dir:
        from genmesh.bench.plots import write_plots

        result["plots"] = [str(p) for p in write_plots(result, Path(args.plot_dir))]
    return _print(result, args.output)

def _print(result: dict, output: str | None) -> int:
    text = json.dumps(result, indent=2)
    print(text)
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")
    return 0


def _write_json(result: dict, output: str) -> None:
    """Write through a temp file and a rename: a reader (or a kill) never sees half."""
    tmp = f"{output}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, output)
