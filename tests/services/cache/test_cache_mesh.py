"""The response cache end to end: the session's mesh (Envoy, frontend, cache service on
Redis, worker), called through Envoy's edge listener."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from genmesh.cli import main as genmesh
from genmesh.client import Client
from genmesh.v1 import cache_pb2, cache_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.conftest import OTHER_API_KEY


@pytest.fixture(scope="module")
def client(mesh):
    with Client(mesh.edge_address, timeout_s=120) as c:
        yield c


def fresh_prompt() -> str:
    """A prompt no earlier test cached."""
    return f"Name one colour of the rainbow. (ref {uuid.uuid4().hex[:8]})"


def generated_tokens(mesh) -> int:
    with mesh.service_channel("worker") as ch:
        return worker_pb2_grpc.WorkerStub(ch).GetStats(worker_pb2.GetStatsRequest(),
                                                       timeout=5).generated_tokens


def cache_stats(mesh) -> cache_pb2.CacheStats:
    with mesh.service_channel("cache") as ch:
        return cache_pb2_grpc.CacheStub(ch).GetStats(cache_pb2.CacheStatsRequest(), timeout=5)


def test_a_repeated_greedy_request_is_replayed_without_inference(mesh, client):
    prompt = fresh_prompt()
    first = client.generate(prompt, max_tokens=12)
    before = generated_tokens(mesh)
    second = client.generate(prompt, max_tokens=12)
    assert not first.usage.response_cached and second.usage.response_cached
    assert second.text == first.text and second.finish_reason == first.finish_reason
    assert second.usage.completion_tokens == first.usage.completion_tokens
    assert second.model_version == first.model_version == "v1"
    assert generated_tokens(mesh) == before  # the replay ran no inference
    assert cache_stats(mesh).store == "redis"


def test_a_replayed_stream_has_the_live_streams_shape(client):
    prompt = fresh_prompt()
    live = list(client.generate_stream(prompt, max_tokens=16))
    replay = list(client.generate_stream(prompt, max_tokens=16))
    assert [c.text for c in replay] == [c.text for c in live]  # the same deltas
    assert replay[0].model_version == "v1" and replay[0].request_id
    assert live[-1].usage is not None and not live[-1].usage.response_cached
    assert replay[-1].usage is not None and replay[-1].usage.response_cached
    assert replay[-1].finish_reason == live[-1].finish_reason


def test_only_deterministic_requests_are_cached(client):
    prompt = fresh_prompt()
    sampled = [client.generate(prompt, max_tokens=8, temperature=0.9) for _ in range(2)]
    assert not any(c.usage.response_cached for c in sampled)  # no seed: never replayed
    seeded = [client.generate(prompt, max_tokens=8, temperature=0.9, seed=7) for _ in range(2)]
    assert [c.usage.response_cached for c in seeded] == [False, True]
    assert seeded[0].text == seeded[1].text
    other_seed = client.generate(prompt, max_tokens=8, temperature=0.9, seed=8)
    assert not other_seed.usage.response_cached  # the seed is part of the key
    with_logprobs = [client.generate(prompt, max_tokens=8, logprobs=2) for _ in range(2)]
    assert not any(c.usage.response_cached for c in with_logprobs)


def test_every_parameter_that_changes_the_answer_is_in_the_key(client):
    prompt = fresh_prompt()
    client.generate(prompt, max_tokens=8)
    assert client.generate(prompt, max_tokens=8).usage.response_cached
    assert not client.generate(prompt, max_tokens=9).usage.response_cached
    assert not client.generate(prompt, max_tokens=8, stop=["blue"]).usage.response_cached
    assert not client.generate(prompt, max_tokens=8,
                               repetition_penalty=1.3).usage.response_cached
    # Defaults that change nothing share answers: greedy ignores the seed.
    assert client.generate(prompt, max_tokens=8, seed=3).usage.response_cached


def test_skip_cache_always_runs_inference(mesh, client):
    prompt = fresh_prompt()
    client.generate(prompt, max_tokens=8)
    before = generated_tokens(mesh)
    again = client.generate(prompt, max_tokens=8, skip_cache=True)
    assert not again.usage.response_cached and generated_tokens(mesh) > before


def test_tenants_never_receive_each_others_answers(mesh, client):
    prompt = fresh_prompt()
    mine = client.generate(prompt, max_tokens=8)
    with Client(mesh.edge_address, timeout_s=120, api_key=OTHER_API_KEY) as other:
        theirs = [other.generate(prompt, max_tokens=8) for _ in range(2)]
    assert not mine.usage.response_cached
    assert [c.usage.response_cached for c in theirs] == [False, True]  # their own entry
    assert client.generate(prompt, max_tokens=8).usage.response_cached


def test_twenty_identical_concurrent_requests_run_one_inference(mesh, client):
    prompt = fresh_prompt()
    before_tokens, before = generated_tokens(mesh), cache_stats(mesh)
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: client.generate(prompt, max_tokens=24), range(20)))
    after = cache_stats(mesh)
    assert len({a.text for a in answers}) == 1
    live = [a for a in answers if not a.usage.response_cached]
    assert len(live) == 1  # one inference; 19 shared its answer
    assert generated_tokens(mesh) - before_tokens == live[0].usage.completion_tokens
    assert after.num_leases - before.num_leases == 1
    assert after.num_shared - before.num_shared + after.num_hits - before.num_hits >= 19


def test_genmesh_cache_stats_and_invalidate_a_tenant(mesh, capsys):
    prompt = fresh_prompt()
    with Client(mesh.edge_address, timeout_s=120, api_key=OTHER_API_KEY) as other:
        other.generate(prompt, max_tokens=6)
        assert other.generate(prompt, max_tokens=6).usage.response_cached
        address = ["--address", mesh.config.mesh_address,
                   "--secrets-dir", str(mesh.config.secrets_dir)]
        assert genmesh(["cache", "invalidate", "--tenant", "other", *address]) == 0
        assert "removed" in capsys.readouterr().out
        assert not other.generate(prompt, max_tokens=6).usage.response_cached
    assert genmesh(["cache", "stats", *address]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["store"] == "redis" and int(stats["numHits"]) > 0
