"""`genmesh bench mesh`'s pieces: stream timing from token counts, summaries, flags."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from unittest import mock

import pytest

from genmesh.bench import mesh
from genmesh.bench.mesh import StreamTiming, non_engine_cpu_ms, summarize, worker_flags


@dataclass
class Item:
    text: str
    tokens: int


def test_time_per_output_token_comes_from_token_counts_not_chunks():
    # Three chunks of text at t = 1.0, 1.2, 1.5 carrying 1, 2 and 3 tokens, then a final
    # message with no text: (1.5 - 1.0) / (6 - 1) = 0.1 s per token.
    items = [Item("a", 1), Item("bc", 2), Item("def", 3), Item("", 0)]
    clock = iter([0.5, 1.0, 1.2, 1.5])

    async def stream():  # type: ignore[no-untyped-def]
        for item in items:
            yield item

    with mock.patch.object(mesh.time, "perf_counter", side_effect=lambda: next(clock)):
        timing = asyncio.run(mesh._timed(stream(), lambda i: bool(i.text), lambda i: i.tokens))
    assert timing.ttft_s == pytest.approx(0.5)
    assert timing.gaps_s == pytest.approx([0.2, 0.3])
    assert timing.tpot_s == pytest.approx(0.1)


def test_summaries_carry_tpot_only_when_streams_have_it():
    with_tpot = summarize([StreamTiming(0.01, [0.002, 0.004], 0.003),
                           StreamTiming(0.03, [0.006], 0.005)])
    assert with_tpot["tpot_ms_p50"] == 4.0 and with_tpot["tpot_ms_p99"] == 5.0
    assert with_tpot["ttft_ms_p50"] == 20.0 and with_tpot["num_gaps"] == 3
    assert "tpot_ms_p50" not in summarize([StreamTiming(0.01, [0.002], None)])


def test_worker_flags():
    assert worker_flags(device="cpu", dummy=False) == ("--engine-process", "true")
    assert worker_flags(device="cuda", dummy=True, engine_process=False) == (
        "--device", "cuda", "--engine-process", "false", "--load-format", "dummy")


def test_non_engine_cpu_leaves_out_the_engine_and_the_client():
    with_core_process = {"frontend": 0.2, "safety": 0.1, "worker-v1": 0.05,
                         "worker-v1/engine": 4.0, "worker-v1/tracker": 0.0, "client": 0.3}
    assert non_engine_cpu_ms(with_core_process, engine_alone=3.9) == 0.35
    # A core on a thread: the worker is charged what it uses beyond the engine alone.
    on_a_thread = {"frontend": 0.2, "worker-v1": 4.5, "client": 0.3}
    assert non_engine_cpu_ms(on_a_thread, engine_alone=4.0) == 0.7
    assert non_engine_cpu_ms(on_a_thread, engine_alone=5.0) == 0.2


def test_cpu_per_token_counts_the_measured_rounds_the_warm_up_apart():
    # frontend: 1.0 s at the start, 1.4 after the warm-up (4 requests: 100 ms each), 1.6
    # after the 1-stream level (2 rounds of 16 tokens: 32 tokens), 2.0 at the end (the
    # 4-stream level: 64 tokens); the client: 5.0, 5.2, 5.3, 5.6. Over both levels:
    # (2.0 - 1.4) s / 96 tokens = 6.25 ms a token.
    bench = mesh.MeshBenchPlan(concurrency=(1, 4), rounds={1: 2, 4: 1}, output_len=16)
    frontend = iter([1.0, 1.4, 1.6, 2.0])
    client = iter([5.0, 5.2, 5.3, 5.6])
    with mock.patch.object(mesh, "_cpu_s", side_effect=lambda pid: next(frontend)), \
            mock.patch.object(mesh, "_self_cpu_s", side_effect=lambda: next(client)):
        meter = mesh._CpuMeter({"frontend": 123})
        for name in (mesh.WARM_UP, "1", "4"):
            meter.mark(name)
    use = meter.use(bench)
    assert use.per_token == {"frontend": 6.25, "client": 4.1667}
    assert use.per_token_by_level == {"1": {"frontend": 6.25, "client": 3.125},
                                      "4": {"frontend": 6.25, "client": 4.6875}}
    assert use.warm_up_per_request == {"frontend": 100.0, "client": 50.0}
