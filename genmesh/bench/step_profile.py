"""Where a decode step's time goes: host (CPU) time vs GPU kernel time, and launches.

``profile_decode_steps`` fills an idle ``EngineCore`` with one request per prompt, runs
their prefill, then times a few pure decode steps twice: plainly (the step's wall time)
and under ``torch.profiler`` (CPU + CUDA activities). The profiler's Chrome trace is
reduced by ``summarize_trace``, a pure function over the trace's dict, so it is tested
on CPU with a hand-made trace. On a CPU device the GPU fields are None.

A step whose host time is well above its GPU busy time is launch-bound: the GPU waits
for the host between kernels, and fewer kernels per step (fusion, CUDA graphs) is the
fix; a step whose GPU busy time is close to its wall time is bound by the kernels.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.worker.engine.core import EngineCore
from services.worker.engine.params import SamplingParams

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")  # Chrome-trace events on the GPU
HOST_API_CATEGORIES = ("cuda_runtime", "cuda_driver")  # CUDA API calls on the host
MAX_NAME_LEN = 96  # kernel names (templated CUTLASS/Triton names) are cut to this
NUM_TOP_KERNELS = 8
MAX_SETUP_STEPS = 10_000  # a prefill that has not finished by then is a bug
MAX_TOKENS = 4096  # output cap of the profiled requests (never reached: they are aborted)


@dataclass(frozen=True, slots=True)
class TraceSummary:
    """Per-step figures read off a profiler trace covering ``num_steps`` steps."""

    gpu_busy_ms: float  # union of kernel/memcpy/memset intervals (overlaps counted once)
    num_gpu_kernels: float  # kernels run on the GPU
    num_launches: float  # host calls that launch work (cudaLaunchKernel, cuLaunchKernel…)
    cuda_api_ms: float  # host time inside CUDA runtime/driver calls
    top_kernels: list[tuple[str, float]]  # (kernel name, share of all kernel time), largest first


@dataclass(frozen=True, slots=True)
class StepProfile:
    batch_size: float  # mean requests per profiled step (all decodes)
    context_len: int  # the longest prompt; decode contexts grow from the prompts' lengths
    num_steps: int  # steps timed (and, separately, profiled)
    step_ms: float  # host wall time per step, without the profiler
    profiled_step_ms: float  # the same under the profiler (inflated by its overhead)
    trace: TraceSummary | None  # None when the trace could not be read

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "batch_size": round(self.batch_size, 1), "context_len": self.context_len,
            "num_steps": self.num_steps, "step_ms": round(self.step_ms, 3),
            "profiled_step_ms": round(self.profiled_step_ms, 3),
        }
        t = self.trace
        if t is None:
            return out
        out.update({
            "gpu_busy_ms": round(t.gpu_busy_ms, 3),
            # GPU busy over the plain step's wall time: near 1 kernel-bound, low launch-bound
            "gpu_busy_fraction": round(t.gpu_busy_ms / self.step_ms, 3) if self.step_ms else None,
            "gpu_kernels_per_step": round(t.num_gpu_kernels, 1),
            "kernel_launches_per_step": round(t.num_launches, 1),
            "cuda_api_ms": round(t.cuda_api_ms, 3),
            "top_kernels": [{"name": n, "share": round(s, 3)} for n, s in t.top_kernels],
        })
        return out


def summarize_trace(trace: dict[str, Any], *, num_steps: int) -> TraceSummary:
    """Reduce a ``torch.profiler`` Chrome trace (``export_chrome_trace``) to per-step
    figures. Durations in the trace are microseconds."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    api = [e for e in events if e.get("cat") in HOST_API_CATEGORIES]
    kernels = [e for e in gpu if e.get("cat") == "kernel"]
    by_name: dict[str, float] = defaultdict(float)
    for e in kernels:
        by_name[str(e.get("name", "?"))[:MAX_NAME_LEN]] += float(e.get("dur", 0))
    kernel_us = sum(by_name.values())
    top = sorted(by_name.items(), key=lambda kv: kv[1], reverse=True)[:NUM_TOP_KERNELS]
    steps = max(num_steps, 1)
    return TraceSummary(
        gpu_busy_ms=_union_us([(float(e["ts"]), float(e.get("dur", 0))) for e in gpu])
        / 1e3 / steps,
        num_gpu_kernels=len(kernels) / steps,
        num_launches=sum("Launch" in str(e.get("name", "")) for e in api) / steps,
        cuda_api_ms=sum(float(e.get("dur", 0)) for e in api) / 1e3 / steps,
        top_kernels=[(n, us / kernel_us) for n, us in top] if kernel_us else [],
    )


def _union_us(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, duration) intervals."""
    total, end = 0.0, float("-inf")
    for start, dur in sorted(spans):
        stop = start + dur
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def profile_decode_steps(core: EngineCore, prompts: list[list[int]], *, num_steps: int = 5,
                         num_warmup: int = 3) -> StepProfile:
    """Profile ``num_steps`` decode steps of one request per prompt on an idle core
    (nothing else may step it meanwhile). Its requests are aborted before returning."""
    device = core.runner.device
    context_len = max(len(p) for p in prompts)
    # Requests whose prefill ends early decode while the rest still prefill, so no
    # request may run out of tokens before the timed steps end: allow the context's
    # worth (they are aborted afterwards).
    max_tokens = min(MAX_TOKENS, core.max_model_len - context_len)
    if max_tokens < num_warmup + 2 * num_steps:
        raise ValueError(f"prompts of {context_len} tokens leave too few to time "
                         f"(max_model_len {core.max_model_len})")
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    request_ids = [f"step-profile-{i}" for i in range(len(prompts))]
    try:
        for rid, prompt in zip(request_ids, prompts, strict=True):
            core.add(core.make_request(rid, prompt, params))
        _prefill_all(core, set(request_ids))
        for _ in range(num_warmup):
            core.step()
        step_s = _time_steps(core, num_steps, device)
        batch = core.stats().recent_batch_sizes[-num_steps:]
        profiled_s, trace = _profiled_steps(core, num_steps, device)
    finally:
        for rid in request_ids:
            core.abort(rid)
    return StepProfile(
        batch_size=sum(batch) / len(batch) if batch else 0.0, context_len=context_len,
        num_steps=num_steps, step_ms=step_s / num_steps * 1e3,
        profiled_step_ms=profiled_s / num_steps * 1e3,
        trace=summarize_trace(trace, num_steps=num_steps) if trace is not None else None,
    )


def _prefill_all(core: EngineCore, request_ids: set[str]) -> None:
    """Step until every request has its first token (all later steps are decodes)."""
    waiting = set(request_ids)
    for _ in range(MAX_SETUP_STEPS):
        if not waiting:
            return
        for delta in core.step():
            waiting.discard(delta.request_id)
    raise RuntimeError(f"{len(waiting)} requests still in prefill after {MAX_SETUP_STEPS} steps")


def _time_steps(core: EngineCore, num_steps: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(num_steps):
        core.step()  # ends by copying the sampled tokens to the host: a sync per step
    sync(device)
    return time.perf_counter() - t0


def _profiled_steps(core: EngineCore, num_steps: int, device: torch.device
                    ) -> tuple[float, dict[str, Any] | None]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        seconds = _time_steps(core, num_steps, device)
    if device.type != "cuda":
        return seconds, None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        return seconds, json.loads(path.read_text())


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
