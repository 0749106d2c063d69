"""The worker's Prometheus series. Their names are a contract: dashboards and alerts are
written against them. Every series has the labels ``model`` (the served name) and
``version`` (the worker pool's model version); GPU series add ``gpu`` (NVML's index).

Two sources feed them:

- ``refresh``, every ``REFRESH_S`` seconds from a task on the server's event loop: load
  gauges and engine-wide counters from ``engine.stats()``, and GPU gauges from NVML. A
  task rather than a custom collector called by the scrape thread, because the
  TensorRT-LLM engine's ``stats()`` reads state its event loop changes; here every read
  happens on that loop, and a scrape never waits on the engine or the driver.
- ``observe_finished``, when a request ends: its stage durations and cost.

Cost is an estimate: device seconds x ``price_per_device_hour`` / 3600, where a
request's device seconds are its token-proportional share of the steps it was in.
"""

from __future__ import annotations

import asyncio
import logging

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.telemetry import FollowedTotal
from services.worker.engine.api import Engine
from services.worker.engine.outputs import EngineStats, RequestTimings
from services.worker.gpu import Nvml

log = logging.getLogger("genmesh.worker")

REFRESH_S = 0.5
LABELS = ("model", "version")
# A step is milliseconds, a long queue or generation minutes.
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# A short request on a cheap device costs around a millionth of a dollar.
COST_BUCKETS = (1e-7, 2.5e-7, 5e-7, 1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4,
                5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 1e-1)


class WorkerMetrics:
    """The worker's series; only the event loop's thread calls its methods."""

    def __init__(self, *, model: str, version: str, price_per_device_hour: float,
                 gpus: Nvml | None = None,
                 registry: CollectorRegistry = prometheus_client.REGISTRY) -> None:
        values = (model, version)
        self._values = values
        self.price_per_device_second = price_per_device_hour / 3600
        self._gpus = gpus

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=registry).labels(*values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=registry).labels(*values)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets,
                             registry=registry).labels(*values)

        self.num_requests_running = gauge("genmesh_num_requests_running",
                                          "Requests scheduled in the engine (holding KV).")
        self.num_requests_waiting = gauge("genmesh_num_requests_waiting",
                                          "Requests queued in the engine.")
        self.kv_cache_usage_perc = gauge("genmesh_kv_cache_usage_perc",
                                         "KV blocks in use / all KV blocks (0..1).")
        self._prefix_cache_queries = FollowedTotal(counter(
            "genmesh_prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache."))
        self._prefix_cache_hits = FollowedTotal(counter(
            "genmesh_prefix_cache_hits_total",
            "Prompt tokens found in the prefix cache."))
        self._num_preemptions = FollowedTotal(counter(
            "genmesh_num_preemptions_total",
            "Running requests preempted (KV freed, recomputed later)."))
        # Speculative decoding: acceptance rate = accepted / proposed; tokens a verifying
        # step emits = emitted / verifications.
        self._spec_proposed = FollowedTotal(counter(
            "genmesh_spec_decode_draft_tokens_total", "Draft tokens verified."))
        self._spec_accepted = FollowedTotal(counter(
            "genmesh_spec_decode_accepted_tokens_total", "Draft tokens accepted."))
        self._spec_verifications = FollowedTotal(counter(
            "genmesh_spec_decode_verifications_total",
            "Request-steps that verified drafts."))
        self._spec_emitted = FollowedTotal(counter(
            "genmesh_spec_decode_emitted_tokens_total",
            "Tokens emitted by request-steps that verified drafts (accepted + 1 each)."))
        self._device_seconds = FollowedTotal(counter(
            "genmesh_device_seconds_total",
            "Wall time of the engine's steps (device busy time, all requests)."))
        cost_total = Counter("genmesh_cost_dollars_total",
                             "Estimated device cost in USD (device seconds x price).",
                             LABELS, registry=registry)
        cost_per_request = Histogram(
            "genmesh_request_cost_dollars",
            "Estimated device cost of one finished request in USD.",
            LABELS, buckets=COST_BUCKETS, registry=registry)
        # With no price, the cost series stay absent rather than read as "free".
        is_costed = self.price_per_device_second > 0
        self._cost = FollowedTotal(cost_total.labels(*values)) if is_costed else None
        self.request_cost = cost_per_request.labels(*values) if is_costed else None
        self.queue_time = histogram("genmesh_request_queue_time_seconds",
                                    "Arrival to first scheduled step.", TIME_BUCKETS)
        self.prefill_time = histogram("genmesh_request_prefill_time_seconds",
                                      "First scheduled step to first output token.",
                                      TIME_BUCKETS)
        self.decode_time = histogram("genmesh_request_decode_time_seconds",
                                     "First output token to finish.", TIME_BUCKETS)
        if gpus is not None:
            gpu_labels = (*LABELS, "gpu")
            self._gpu_utilization = Gauge("genmesh_gpu_utilization_perc",
                                          "Share of time a kernel ran on the GPU (0..1).",
                                          gpu_labels, registry=registry)
            self._gpu_memory_used = Gauge("genmesh_gpu_memory_used_bytes",
                                          "GPU memory in use (all processes).",
                                          gpu_labels, registry=registry)
            self._gpu_memory_total = Gauge("genmesh_gpu_memory_total_bytes",
                                           "GPU memory in all.", gpu_labels, registry=registry)

    def refresh(self, stats: EngineStats) -> None:
        """Set the gauges and engine-wide counters from a stats snapshot (and NVML)."""
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        total = stats.num_kv_blocks_total
        self.kv_cache_usage_perc.set(
            (total - stats.num_kv_blocks_free) / total if total else 0.0)
        self._prefix_cache_queries.follow(stats.prefix_cache_queries)
        self._prefix_cache_hits.follow(stats.prefix_cache_hits)
        self._num_preemptions.follow(stats.num_preemptions)
        self._device_seconds.follow(stats.device_seconds)
        self._spec_proposed.follow(stats.spec_proposed_tokens)
        self._spec_accepted.follow(stats.spec_accepted_tokens)
        self._spec_verifications.follow(stats.spec_verifications)
        self._spec_emitted.follow(stats.spec_emitted_tokens)
        if self._cost is not None:
            self._cost.follow(stats.device_seconds * self.price_per_device_second)
        if self._gpus is not None:
            for sample in self._gpus.sample():
                labels = (*self._values, str(sample.index))
                self._gpu_utilization.labels(*labels).set(sample.utilization_perc)
                self._gpu_memory_used.labels(*labels).set(sample.memory_used_bytes)
                self._gpu_memory_total.labels(*labels).set(sample.memory_total_bytes)

    def observe_finished(self, timings: RequestTimings) -> None:
        self.queue_time.observe(timings.queue_s)
        self.prefill_time.observe(timings.prefill_s)
        self.decode_time.observe(timings.decode_s)
        if self.request_cost is not None:
            self.request_cost.observe(timings.device_seconds * self.price_per_device_second)

    async def refresh_forever(self, engine: Engine, *, interval_s: float = REFRESH_S) -> None:
        """``refresh`` every ``interval_s`` until cancelled; a failed refresh is logged."""
        while True:
            try:
                self.refresh(engine.stats())
            except Exception:
                log.exception("refreshing metrics failed")
            await asyncio.sleep(interval_s)
