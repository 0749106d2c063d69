"""The worker's metrics endpoint and spans, from a real worker process: its Prometheus
text as a scraper reads it, and its spans as an OTLP collector receives them."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from genmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.otlp import OtlpReceiver, ReceivedSpan
from tests.procs import free_port, service

PROMPT = list(range(300, 340))  # 40 tokens: a repeat finds 2 full 16-token blocks cached
MAX_TOKENS = 5
PRICE_PER_DEVICE_HOUR = 36.0  # $0.01 per device second
TRACE_ID = "5e1f" * 8
PARENT_SPAN_IDS = ("00f067aa0ba902b7", "00f067aa0ba902b8")  # the callers' spans
SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset({"model": "tiny-llama", "version": "v7",
                                         **labels}.items())), 0.0)


@dataclass(frozen=True)
class Observed:
    before: Samples  # a scrape before the calls
    after: Samples  # a scrape once the refresh task has seen both calls
    replies: list[list[worker_pb2.WorkerGenerateResponse]]  # per call
    receiver: OtlpReceiver


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> Iterator[Observed]:
    """One worker, two identical Generate calls with W3C trace context, in one trace."""
    port, metrics_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with OtlpReceiver() as rx:
        args = ["--port", str(port), "--model", "tiny-llama", "--load-format", "dummy",
                "--dtype", "bfloat16", "--model-version", "v7", "--kv-cache-gib", "0.01",
                "--num-threads", "1", "--metrics-port", str(metrics_port),
                "--otlp-endpoint", rx.endpoint,
                "--price-per-device-hour", str(PRICE_PER_DEVICE_HOUR)]
        with service("services.worker.main", args, port=port, log_path=log):
            before = scrape(metrics_port)
            replies = []
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                for parent in PARENT_SPAN_IDS:
                    request = worker_pb2.WorkerGenerateRequest(
                        prompt_ids=PROMPT,
                        params=common_pb2.SamplingParams(max_tokens=MAX_TOKENS,
                                                         ignore_eos=True))
                    metadata = (("traceparent", f"00-{TRACE_ID}-{parent}-01"),)
                    replies.append(list(stub.Generate(request, metadata=metadata,
                                                      timeout=30)))
            after = scrape(metrics_port)
            deadline = time.monotonic() + 5  # the gauges refresh every 0.5 s
            while (value(after, "genmesh_prefix_cache_queries_total")
                   < value(before, "genmesh_prefix_cache_queries_total") + 2 * len(PROMPT)):
                assert time.monotonic() < deadline, "metrics not refreshed"
                time.sleep(0.1)
                after = scrape(metrics_port)
            yield Observed(before, after, replies, rx)


def grew(observed: Observed, name: str, **labels: str) -> float:
    return value(observed.after, name, **labels) - value(observed.before, name, **labels)


def test_metrics_move_with_finished_requests(observed):
    assert grew(observed, "genmesh_request_queue_time_seconds_count") == 2
    assert grew(observed, "genmesh_request_prefill_time_seconds_count") == 2
    assert grew(observed, "genmesh_request_decode_time_seconds_count") == 2
    # Every prompt token is looked up; the repeat finds its first two blocks.
    assert grew(observed, "genmesh_prefix_cache_queries_total") == 2 * len(PROMPT)
    assert grew(observed, "genmesh_prefix_cache_hits_total") == 32
    device_s = value(observed.after, "genmesh_device_seconds_total")
    assert device_s > 0
    assert value(observed.after, "genmesh_cost_dollars_total") == pytest.approx(
        device_s * PRICE_PER_DEVICE_HOUR / 3600)
    assert grew(observed, "genmesh_request_cost_dollars_count") == 2
    assert 0 < grew(observed, "genmesh_request_cost_dollars_sum") <= device_s * 0.01 * 1.0001


def test_load_gauges_are_present_and_gpu_ones_absent_on_cpu(observed):
    names = {name for name, _ in observed.after}
    assert {"genmesh_num_requests_running", "genmesh_num_requests_waiting",
            "genmesh_kv_cache_usage_perc"} <= names
    assert value(observed.after, "genmesh_num_requests_running") == 0  # all finished
    assert 0 <= value(observed.after, "genmesh_kv_cache_usage_perc") <= 1
    assert not [name for name in names if name.startswith("genmesh_gpu_")]


def server_spans(rx: OtlpReceiver) -> list[ReceivedSpan]:
    """The worker's Generate spans, once both have arrived with their stage spans."""

    def complete(spans: list[ReceivedSpan]) -> bool:
        servers = [s for s in spans if s.parent_span_id in PARENT_SPAN_IDS]
        stages = [s for s in spans if s.parent_span_id in {p.span_id for p in servers}]
        return len(servers) == 2 and len(stages) == 6

    rx.wait_for(complete, timeout_s=10)
    spans = rx.trace(TRACE_ID)
    return sorted((s for s in spans if s.parent_span_id in PARENT_SPAN_IDS),
                  key=lambda s: PARENT_SPAN_IDS.index(s.parent_span_id))


def test_server_span_continues_the_callers_trace_with_genai_attributes(observed):
    first, repeat = server_spans(observed.receiver)
    for span in (first, repeat):
        assert (span.service, span.kind) == ("genmesh-worker-v7", SERVER_KIND)
        assert span.name.endswith("/Generate")
        attrs = span.attributes
        assert attrs["gen_ai.system"] == "genmesh"
        assert attrs["gen_ai.operation.name"] == "text_completion"
        assert attrs["gen_ai.request.model"] == "tiny-llama"
        assert attrs["gen_ai.request.max_tokens"] == MAX_TOKENS
        assert attrs["gen_ai.request.temperature"] == 0.0
        assert attrs["gen_ai.usage.input_tokens"] == len(PROMPT)
        assert attrs["gen_ai.usage.output_tokens"] == MAX_TOKENS
        assert attrs["gen_ai.response.finish_reasons"] == ["length"]
        assert attrs["genmesh.model_version"] == "v7"
    assert first.attributes["genmesh.cached_prompt_tokens"] == 0
    assert repeat.attributes["genmesh.cached_prompt_tokens"] == 32


def test_stage_spans_are_consecutive_children_inside_the_server_span(observed):
    rx = observed.receiver
    for server in server_spans(rx):
        stages = [s for s in rx.trace(TRACE_ID) if s.parent_span_id == server.span_id]
        assert [s.name for s in stages] == ["queue", "prefill", "decode"]
        queue, prefill, decode = stages
        assert queue.end_ns == prefill.start_ns and prefill.end_ns == decode.start_ns
        assert all(s.start_ns <= s.end_ns for s in stages)
        assert prefill.end_ns > prefill.start_ns  # a model step ran
        # Monotonic times mapped to the epoch: within a millisecond of the server span.
        assert server.start_ns - 1_000_000 <= queue.start_ns
        assert decode.end_ns <= server.end_ns + 1_000_000


def test_no_span_holds_the_prompt(observed):
    spans = observed.receiver.trace(TRACE_ID)
    assert len(spans) == 8
    prompt_texts = [sep.join(map(str, PROMPT[:4])) for sep in (",", ", ", " ")]
    for span in spans:
        for attribute in span.attributes.values():
            assert attribute != PROMPT
            assert not any(text in str(attribute) for text in prompt_texts)
