"""Every service's Prometheus endpoint on the session's mesh, scraped before and after
known traffic and parsed with prometheus_client's parser; and a real Prometheus (when
installed) answering PromQL over them."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
import uuid
from collections import defaultdict

import pytest
from prometheus_client.parser import text_string_to_metric_families

from genmesh.client import Client
from genmesh.launcher.prometheus import prometheus_binary

Samples = dict[str, list[tuple[dict[str, str], float]]]  # sample name → (labels, value)


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name].append((dict(sample.labels), sample.value))
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if labels.items() <= lab.items())


def grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def test_every_service_exports_its_series_and_they_follow_known_traffic(mesh):
    c = mesh.config
    ports = {"frontend": c.frontend_metrics_port, "worker": c.worker_metrics_port,
             "tokenizer": c.tokenizer_metrics_port, "safety": c.safety_metrics_port,
             "cache": c.cache_metrics_port, "ratelimit": c.ratelimit_metrics_port}
    # The worker and the cache service publish their counts every half second: let what
    # earlier tests did land before the first scrape, as the sleep below does after.
    time.sleep(1.0)
    before = {name: scrape(port) for name, port in ports.items()}
    prompts = [f"Count to {i}. ({uuid.uuid4().hex[:6]})" for i in range(3)]
    with Client(mesh.edge_address, timeout_s=60) as client:
        live = [client.generate(p, max_tokens=6) for p in prompts]
        replay = client.generate(prompts[0], max_tokens=6)
        streamed = list(client.generate_stream(f"Say hi. ({uuid.uuid4().hex[:6]})",
                                               max_tokens=6, skip_cache=True))
    assert replay.usage.response_cached and not any(r.usage.response_cached for r in live)
    time.sleep(1.0)  # the worker's gauges refresh twice a second
    after = {name: scrape(port) for name, port in ports.items()}
    f0, f1 = before["frontend"], after["frontend"]

    # Frontend: one TTFT and one end-to-end sample per request, replay included.
    assert grew(f0, f1, "genmesh_time_to_first_token_seconds_count") == 5
    assert grew(f0, f1, "genmesh_e2e_request_latency_seconds_count") == 5
    assert grew(f0, f1, "genmesh_requests_total", tenant="dev", method="Generate") == 4
    assert grew(f0, f1, "genmesh_requests_total", method="GenerateStream") == 1
    assert grew(f0, f1, "genmesh_inter_token_latency_seconds_count") > 0
    # Tokens count inference only: the replay adds none.
    inferred = [*live, streamed[-1]]
    assert grew(f0, f1, "genmesh_generation_tokens_total", tenant="dev") == sum(
        r.usage.completion_tokens for r in inferred)
    assert grew(f0, f1, "genmesh_prompt_tokens_total", tenant="dev") == sum(
        r.usage.prompt_tokens for r in inferred)
    assert grew(f0, f1, "genmesh_cached_prompt_tokens_total", tenant="dev") == sum(
        r.usage.cached_prompt_tokens for r in inferred)
    assert grew(f0, f1, "genmesh_response_cache_requests_total", result="hit") == 1
    assert grew(f0, f1, "genmesh_response_cache_requests_total", result="miss") == 3
    assert grew(f0, f1, "genmesh_budget_tokens_used_total", tenant="dev") > 0
    assert total(f1, "genmesh_budget_tokens_per_minute", tenant="dev") == 200_000

    # Worker: a queue-time sample per inferred request; the prefix cache was consulted.
    w0, w1 = before["worker"], after["worker"]
    assert grew(w0, w1, "genmesh_request_queue_time_seconds_count", version="v1") == 4
    assert grew(w0, w1, "genmesh_prefix_cache_queries_total") >= sum(
        r.usage.prompt_tokens for r in inferred)
    assert grew(w0, w1, "genmesh_device_seconds_total") > 0
    assert "genmesh_num_requests_running" in w1 and "genmesh_kv_cache_usage_perc" in w1
    assert "genmesh_gpu_utilization_perc" not in w1  # no GPU here

    # The other services.
    # The frontend detokenizes in-process: the tokenizer service sees prompts only.
    assert grew(before["tokenizer"], after["tokenizer"], "genmesh_tokenizer_requests_total",
                method="Tokenize") >= 5  # 3 live, the replay, the stream
    assert grew(before["tokenizer"], after["tokenizer"], "genmesh_tokenizer_requests_total",
                method="Detokenize") == 0
    assert grew(before["safety"], after["safety"], "genmesh_safety_decisions_total",
                direction="prompt", action="allow") >= 4
    assert grew(before["cache"], after["cache"], "genmesh_cache_lookups_total",
                result="hit") == 1
    assert grew(before["ratelimit"], after["ratelimit"], "genmesh_ratelimit_decisions_total",
                tenant="dev", result="ok") >= 5


@pytest.mark.skipif(prometheus_binary() is None,
                    reason="the `prometheus` binary is not installed (apt install prometheus)")
def test_a_real_prometheus_answers_p99_ttft(mesh):
    with Client(mesh.edge_address, timeout_s=60) as client:
        for _ in range(4):
            client.generate(f"Name a colour. ({uuid.uuid4().hex[:6]})", max_tokens=4)
    query = ("histogram_quantile(0.99, sum by (le) "
             "(rate(genmesh_time_to_first_token_seconds_bucket[1m])))")
    url = (f"http://127.0.0.1:{mesh.config.prometheus_port}/api/v1/query?"
           + urllib.parse.urlencode({"query": query}))
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(url, timeout=5) as reply:
            answer = json.loads(reply.read())
        result = answer["data"]["result"]
        if result and result[0]["value"][1] not in ("NaN", "0"):
            break
        assert time.monotonic() < deadline, f"no p99 TTFT from Prometheus: {answer}"
        time.sleep(1.0)
    p99_s = float(result[0]["value"][1])
    print(f"Prometheus p99 TTFT over the last minute: {p99_s * 1e3:.0f} ms")
    assert 0 < p99_s < 60
