"""WorkerMetrics on a private registry: what each series reads from stats and timings."""

from __future__ import annotations

import dataclasses
import sys
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from services.worker.engine.outputs import EngineStats, RequestTimings
from services.worker.gpu import Nvml
from services.worker.metrics import WorkerMetrics

LABELS = {"model": "m", "version": "v2"}

IDLE = EngineStats(num_running=0, num_waiting=0, num_kv_blocks_total=100,
                   num_kv_blocks_free=100, num_kv_blocks_cached=0, prefix_cache_queries=0,
                   prefix_cache_hits=0, num_preemptions=0, num_steps=0, num_finished=0,
                   generated_tokens=0, mean_batch_size=0.0, mean_step_ms=0.0,
                   device_seconds=0.0)


def metrics(price: float = 0.0, gpus: Nvml | None = None
            ) -> tuple[WorkerMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    return WorkerMetrics(model="m", version="v2", price_per_device_hour=price, gpus=gpus,
                         registry=registry), registry


def value(registry: CollectorRegistry, name: str, **extra: str) -> float | None:
    return registry.get_sample_value(name, {**LABELS, **extra})


def test_refresh_sets_gauges_and_follows_engine_totals():
    m, registry = metrics(price=3.6)  # $0.001 per device second
    busy = dataclasses.replace(IDLE, num_running=3, num_waiting=2, num_kv_blocks_free=75,
                               prefix_cache_queries=40, prefix_cache_hits=16,
                               num_preemptions=1, device_seconds=2.0)
    m.refresh(busy)
    m.refresh(busy)  # the same totals again add nothing
    assert value(registry, "genmesh_num_requests_running") == 3
    assert value(registry, "genmesh_num_requests_waiting") == 2
    assert value(registry, "genmesh_kv_cache_usage_perc") == 0.25
    assert value(registry, "genmesh_prefix_cache_queries_total") == 40
    assert value(registry, "genmesh_prefix_cache_hits_total") == 16
    assert value(registry, "genmesh_num_preemptions_total") == 1
    assert value(registry, "genmesh_device_seconds_total") == 2.0
    assert value(registry, "genmesh_cost_dollars_total") == pytest.approx(0.002)
    m.refresh(dataclasses.replace(busy, prefix_cache_queries=50, device_seconds=3.0))
    assert value(registry, "genmesh_prefix_cache_queries_total") == 50
    assert value(registry, "genmesh_cost_dollars_total") == pytest.approx(0.003)


def test_finished_requests_fill_the_stage_and_cost_histograms():
    m, registry = metrics(price=3.6)
    m.observe_finished(RequestTimings(arrival_time=10.0, queue_s=0.002, prefill_s=0.3,
                                      decode_s=20.0, device_seconds=0.5))
    for stage, le in (("queue", "0.0025"), ("prefill", "0.5"), ("decode", "30.0")):
        name = f"genmesh_request_{stage}_time_seconds"
        assert value(registry, f"{name}_count") == 1
        assert value(registry, f"{name}_bucket", le=le) == 1
    assert value(registry, "genmesh_request_cost_dollars_sum") == pytest.approx(0.0005)
    assert value(registry, "genmesh_request_cost_dollars_bucket", le="0.0005") == 1
    assert value(registry, "genmesh_request_cost_dollars_bucket", le="0.00025") == 0


def test_without_a_price_there_are_no_cost_series_but_device_seconds_count():
    m, registry = metrics(price=0.0)
    m.refresh(dataclasses.replace(IDLE, device_seconds=4.0))
    m.observe_finished(RequestTimings(0.0, 0.0, 0.1, 0.1, 0.2))
    assert value(registry, "genmesh_device_seconds_total") == 4.0
    assert value(registry, "genmesh_cost_dollars_total") is None
    assert value(registry, "genmesh_request_cost_dollars_count") is None


class FakeNvml:
    """The parts of pynvml that Nvml calls, for two GPUs."""

    def __init__(self) -> None:
        self.is_shut_down = False

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=(handle + 1) * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=[37, 100][handle])

    def nvmlShutdown(self) -> None:
        self.is_shut_down = True


def test_gpu_gauges_per_gpu_only_when_nvml_is_there():
    nvml = FakeNvml()
    gpus = Nvml(nvml, handles=[0, 1])
    m, registry = metrics(gpus=gpus)
    m.refresh(IDLE)
    assert value(registry, "genmesh_gpu_utilization_perc", gpu="0") == 0.37
    assert value(registry, "genmesh_gpu_utilization_perc", gpu="1") == 1.0
    assert value(registry, "genmesh_gpu_memory_used_bytes", gpu="1") == 2 * 2**30
    assert value(registry, "genmesh_gpu_memory_total_bytes", gpu="0") == 80 * 2**30
    gpus.close()
    assert nvml.is_shut_down

    _, no_gpu = metrics(gpus=None)
    assert not [f for f in no_gpu.collect() if f.name.startswith("genmesh_gpu_")]


def test_nvml_is_absent_here_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    assert Nvml.open() is None
