"""`genmesh bench engine`: throughput, prefix-cache TTFT and roofline, as JSON."""

from __future__ import annotations

import argparse
import json

from genmesh.models.store import ModelStore, default_store_root
from services.worker.engine.config import EngineConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (print JSON)")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    e = bsub.add_parser("engine", help="the native engine vs HF transformers")
    e.add_argument("--quick", action="store_true", help="a small run (under a minute)")
    e.add_argument("--model", default="smollm2-135m-instruct",
                   help="store name, HF folder, or with --dummy a preset (e.g. llama-3-8b)")
    e.add_argument("--dummy", action="store_true", help="random weights of the model's shape")
    e.add_argument("--dtype", default="bfloat16")
    e.add_argument("--device", default="cpu")
    e.add_argument("--kv-cache-gib", type=float, default=2.0)
    e.add_argument("--max-num-batched-tokens", type=int, default=512)
    e.add_argument("--no-hf", action="store_true", help="skip the HF transformers baselines")
    e.add_argument("--output", help="also write the JSON to this file")
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
    from genmesh.bench.engine import FULL, QUICK, run_engine_bench

    model = args.model
    if not args.dummy:
        model = str(ModelStore(default_store_root()).ensure(args.model))
    config = EngineConfig(model=model, dtype=args.dtype, device=args.device,
                          load_format="dummy" if args.dummy else "auto",
                          kv_cache_memory_gib=args.kv_cache_gib,
                          max_num_batched_tokens=args.max_num_batched_tokens)
    result = run_engine_bench(config, QUICK if args.quick else FULL, with_hf=not args.no_hf)
    return _print(result, args.output)


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
