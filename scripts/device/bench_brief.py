"""A few lines per `genmesh bench engine` JSON, for the device call's output tail (the
whole JSON comes back as a file). Usage: python bench_brief.py BENCH.json"""

from __future__ import annotations

import json
import sys


def brief(result: dict) -> list[str]:
    state = "partial" if result.get("partial") else "complete"
    lines = [f"bench {result.get('model')} ({state})"]
    if "error" in result:
        lines.append(f"  error: {result['error']}")
    for level, t in result.get("engine", {}).get("throughput", {}).items():
        phases = "/".join(str(t.get(k)) for k in ("mean_prepare_ms", "mean_forward_ms",
                                                   "mean_sample_ms"))
        lines.append(f"  c={level}: {t['tokens_per_s']} tok/s, step {t['mean_step_ms']} ms, "
                     f"batch {t['mean_batch_size']}, prepare/forward/sample {phases} ms")
    for level, p in (result.get("step_profile") or {}).items():
        if isinstance(p, dict) and "step_ms" in p:
            lines.append(f"  profile b={level}: step {p['step_ms']} ms, gpu busy "
                         f"{p.get('gpu_busy_ms')} ms, {p.get('gpu_kernels_per_step')} kernels, "
                         f"{p.get('kernel_launches_per_step')} launches per step")
        else:
            lines.append(f"  profile {level}: {p}")
    if "single_stream" in result.get("engine", {}):
        lines.append(f"  single stream {result['engine']['single_stream']}, "
                     f"prefix TTFT {result['engine'].get('prefix_ttft')}")
    lines.append(f"  hf {json.dumps(result.get('hf'))}")
    lines.append(f"  ratios {json.dumps(result.get('ratios'))}")
    return lines


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print("\n".join(brief(json.load(f))))
