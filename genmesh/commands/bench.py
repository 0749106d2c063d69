"""`genmesh bench engine`: throughput, prefix-cache TTFT and roofline, as JSON."""

from __future__ import annotations

import argparse
import json
import os

from genmesh.models.store import ModelStore, default_store_root
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
    e.add_argument("--output", help="also write the JSON to this file (updated after each "
                                    "stage, with \"partial\": true until the run ends)")
    e.set_defaults(func=_engine)
    m = bsub.add_parser("mesh", help="latency the mesh adds over the in-process engine")
    m.add_argument("--quick", action="store_true", help="a small run (under a minute)")
    m.add_argument("--model", default="smollm2-135m-instruct", help="a model in the store")
    m.add_argument("--dtype", default="bfloat16")
    m.add_argument("--kv-cache-gib", type=float, default=1.0)
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


def _engine(args: argparse.Namespace) -> int:
    from genmesh.bench.engine import make_plan, run_engine_bench

    plan = make_plan("quick" if args.quick else (args.plan or "full"),
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
    print(json.dumps(result, indent=2))
    if args.output:
        _write_json(result, args.output)
    return 0


def _mesh(args: argparse.Namespace) -> int:
    from genmesh.bench.mesh import FULL, QUICK, run_mesh_bench

    model_dir = ModelStore(default_store_root()).ensure(args.model)
    result = run_mesh_bench(model_dir, model=args.model, dtype=args.dtype,
                            kv_cache_gib=args.kv_cache_gib, bench=QUICK if args.quick else FULL)
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
