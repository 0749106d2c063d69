"""Sweep the Triton paged-attention kernels' launch shapes on a GPU; JSON to $OUT.

For the Llama-3-8B and SmolLM2 shapes: decode at the batch sizes and contexts the engine
bench runs (and a long single-stream context), and a 4,096-token prefill step, each
over tile sizes, warps and pipeline stages, timed with CUDA events; torch's SDPA on the
same data (dense, no paging) is the reference. Run on the device:

    python3 scripts/device/tune_attention.py            # writes $OUT/tune-attention.json

``--smoke`` runs one tiny case of each on the CPU (under TRITON_INTERPRET=1) to test the
script itself.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from services.worker.engine.model import triton_attention as ta

SHAPES = {  # name: (query heads, kv heads, head dim)
    "llama-3-8b": (32, 8, 128),
    "smollm2-135m": (9, 3, 64),
}
BLOCK_SIZE = 16


def _time_ms(fn: Any, *, iters: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _paged(batch: int, ctx: int, hkv: int, d: int, *, width_blocks: int,
           device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A cache holding ``batch`` sequences of ``ctx`` tokens in shuffled blocks."""
    per_seq = -(-ctx // BLOCK_SIZE)
    num_blocks = batch * per_seq + 1
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks - 1, device=device) + 1
    table = torch.zeros(batch, max(width_blocks, per_seq), dtype=torch.int64, device=device)
    table[:, :per_seq] = perm[: batch * per_seq].view(batch, per_seq)
    ctx_lens = torch.full((batch,), ctx, dtype=torch.int64, device=device)
    return k_cache, v_cache, table, ctx_lens


def _sweep(names: tuple[str, ...], grid: list[tuple[int, int, int]], pin: Any, call: Any,
           *, iters: int, device: torch.device, per_ms: Any = None
           ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Time ``call`` under each launch shape of ``grid`` (``pin(shape)`` pins it; ``pin(None)``
    restores the rules after). Returns every row and the fastest."""
    rows = []
    try:
        for config in grid:
            pin(config)
            row: dict[str, Any] = dict(zip(names, config, strict=True))
            try:
                ms = _time_ms(call, iters=iters, device=device)
            except Exception as exc:  # a shape that does not compile: say so, go on
                rows.append(row | {"error": str(exc)[:200]})
                continue
            rows.append(row | {"ms": round(ms, 4)} | (per_ms(ms) if per_ms else {}))
    finally:
        pin(None)
    best = min((r for r in rows if "ms" in r), key=lambda r: r["ms"], default=None)
    return rows, best


def _pin_decode(config: tuple[int, int, int] | None) -> None:
    ta.DECODE_OVERRIDE = config


def _pin_prefill(config: tuple[int, int, int] | None) -> None:
    ta.PREFILL_OVERRIDE = config


def decode_cases(smoke: bool) -> list[dict[str, int]]:
    if smoke:
        return [{"batch": 2, "ctx": 40, "width_blocks": 4}]
    return [{"batch": 256, "ctx": 260, "width_blocks": 512},
            {"batch": 64, "ctx": 260, "width_blocks": 512},
            {"batch": 1, "ctx": 4096, "width_blocks": 512}]


def sweep_decode(shape: str, device: torch.device, dtype: torch.dtype, *, smoke: bool,
                 iters: int) -> list[dict[str, Any]]:
    hq, hkv, d = SHAPES[shape]
    grid = ([(64, 4, 2)] if smoke else
            list(itertools.product((32, 64, 128), (2, 4, 8), (1, 3))))
    out = []
    for case in decode_cases(smoke):
        b, ctx = case["batch"], case["ctx"]
        k_cache, v_cache, table, ctx_lens = _paged(b, ctx, hkv, d, device=device, dtype=dtype,
                                                   width_blocks=case["width_blocks"])
        q = torch.randn(b, hq, d, device=device, dtype=dtype)
        splits = ta.decode_splits(b * hkv, table.shape[1] * BLOCK_SIZE)  # as the engine does
        kv_bytes = 2 * b * ctx * hkv * d * k_cache.element_size()
        # Reference: SDPA over the same context laid out densely.
        kd = torch.randn(b, hkv, ctx, d, device=device, dtype=dtype)
        ref_ms = _time_ms(functools.partial(F.scaled_dot_product_attention,
                                            q.view(b, hkv, hq // hkv, d), kd, kd),
                          iters=iters, device=device)
        rows, best = _sweep(
            ("block_n", "warps", "stages"), grid, _pin_decode,
            functools.partial(ta.paged_decode_attention, q, k_cache, v_cache, table,
                              ctx_lens, d ** -0.5, num_splits=splits),
            iters=iters, device=device,
            per_ms=lambda ms, n=kv_bytes: {"gb_s": round(n / ms / 1e6, 1)})
        out.append({"shape": shape, **case, "num_splits": splits, "sdpa_dense_ms":
                    round(ref_ms, 4), "best": best, "configs": rows})
        print(f"decode {shape} b={b} ctx={ctx}: best {best} (dense SDPA {ref_ms:.4f} ms)",
              flush=True)
    return out


def sweep_prefill(shape: str, device: torch.device, dtype: torch.dtype, *, smoke: bool,
                  iters: int) -> list[dict[str, Any]]:
    hq, hkv, d = SHAPES[shape]
    cases = ([{"seqs": 2, "query_len": 24, "prefix": 8}] if smoke else
             [{"seqs": 16, "query_len": 256, "prefix": 0},
              {"seqs": 1, "query_len": 4096, "prefix": 0},
              {"seqs": 8, "query_len": 256, "prefix": 1024}])
    grid = ([(64, 64, 8)] if smoke else
            list(itertools.product((32, 64, 128), (32, 64), (4, 8))))
    out = []
    for case in cases:
        s, n, prefix = case["seqs"], case["query_len"], case["prefix"]
        ctx = prefix + n
        k_cache, v_cache, table, ctx_lens = _paged(s, ctx, hkv, d, device=device, dtype=dtype,
                                                   width_blocks=0)
        q = torch.randn(s * n, hq, d, device=device, dtype=dtype)
        cu = torch.arange(0, s * n + 1, n, dtype=torch.int64, device=device)
        qd = torch.randn(s, hq, n, d, device=device, dtype=dtype)
        kd = torch.randn(s, hq, ctx, d, device=device, dtype=dtype)
        ref_ms = _time_ms(functools.partial(F.scaled_dot_product_attention, qd, kd, kd,
                                            is_causal=prefix == 0),
                          iters=iters, device=device)
        rows, best = _sweep(
            ("block_m", "block_n", "warps"), grid, _pin_prefill,
            functools.partial(ta.paged_prefill_attention, q, k_cache, v_cache, table, cu,
                              ctx_lens, d ** -0.5, max_query_len=n),
            iters=iters, device=device)
        out.append({"shape": shape, **case, "sdpa_dense_ms": round(ref_ms, 4), "best": best,
                    "configs": rows})
        print(f"prefill {shape} {case}: best {best} (dense SDPA {ref_ms:.4f} ms)", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one tiny case, on the CPU")
    parser.add_argument("--shapes", default="llama-3-8b,smollm2-135m")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    iters = 2 if args.smoke else 30
    defaults = {"decode_d128": [ta._DECODE_D128_MANY, ta._DECODE_D128_FEW],
                "decode_small_d": ta._DECODE_SMALL_D,
                "prefill": [ta._PREFILL_D128, ta._PREFILL_SMALL_D]}
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if not args.smoke
                              else "cpu", "dtype": str(dtype), "defaults": defaults,
                              "decode": [], "prefill": []}
    out_dir = Path(os.environ.get("OUT", "."))
    for shape in args.shapes.split(","):
        result["decode"] += sweep_decode(shape, device, dtype, smoke=args.smoke, iters=iters)
        result["prefill"] += sweep_prefill(shape, device, dtype, smoke=args.smoke, iters=iters)
        (out_dir / "tune-attention.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
