"""The Cache service as a real process: in memory (no Redis configured) and on a real
Redis that dies and comes back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from genmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2
from tests.procs import RedisServer, free_port, service


def key(tenant: str = "acme", version: str = "v1", prompt: tuple[int, ...] = (1, 2, 3),
        max_tokens: int = 8) -> cache_pb2.CacheKey:
    return cache_pb2.CacheKey(tenant=tenant, model="m", model_version=version,
                              prompt_ids=list(prompt),
                              params=common_pb2.SamplingParams(max_tokens=max_tokens))


def answer(text: str = "hello world",
           reason: common_pb2.FinishReason = common_pb2.FINISH_REASON_STOP
           ) -> cache_pb2.CachedAnswer:
    return cache_pb2.CachedAnswer(text=text, text_chunks=[text[:5], text[5:]],
                                  finish_reason=reason, token_ids=[5, 6],
                                  usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=2))


@contextmanager
def memory_cache(log_dir: Path) -> Iterator[cache_pb2_grpc.CacheStub]:
    port = free_port()
    with service("services.cache.main", ["--port", str(port)], port=port,
                 log_path=log_dir / "cache.log"), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield cache_pb2_grpc.CacheStub(channel)


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[cache_pb2_grpc.CacheStub]:
    """A fresh service for each test: the tests count its lookups and entries."""
    with memory_cache(tmp_path) as stub:
        yield stub


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cache_pb2_grpc.CacheStub]:
    """One service for the tests that leave nothing in it (refused requests)."""
    with memory_cache(tmp_path_factory.mktemp("cache")) as stub:
        yield stub


def test_the_memory_store_answers_hits_misses_and_stats(cache) -> None:
    assert not cache.Lookup(cache_pb2.LookupRequest(key=key()), timeout=5).hit
    assert cache.Store(cache_pb2.CacheStoreRequest(key=key(), answer=answer()),
                       timeout=5).stored
    hit = cache.Lookup(cache_pb2.LookupRequest(key=key()), timeout=5)
    assert hit.hit and hit.answer == answer() and not hit.shared
    for other in (key(tenant="other"), key(version="v2"), key(prompt=(1, 2)),
                  key(max_tokens=9)):
        assert not cache.Lookup(cache_pb2.LookupRequest(key=other), timeout=5).hit
    stats = cache.GetStats(cache_pb2.CacheStatsRequest(), timeout=5)
    assert (stats.store, stats.num_lookups, stats.num_hits, stats.num_entries) == (
        "memory", 6, 1, 1)


def test_incomplete_answers_are_not_stored(cache) -> None:
    for reason in (common_pb2.FINISH_REASON_ABORT, common_pb2.FINISH_REASON_CONTENT_FILTER,
                   common_pb2.FINISH_REASON_ERROR):
        reply = cache.Store(cache_pb2.CacheStoreRequest(key=key(), answer=answer(reason=reason)),
                            timeout=5)
        assert not reply.stored
    assert not cache.Lookup(cache_pb2.LookupRequest(key=key()), timeout=5).hit


def test_single_flight_shares_the_lease_holders_answer(cache) -> None:
    first = cache.Lookup(cache_pb2.LookupRequest(key=key(), single_flight=True, wait_ms=5000),
                         timeout=10)
    assert not first.hit and first.lease_id

    def wait(_: int) -> cache_pb2.CacheLookupResponse:
        return cache.Lookup(cache_pb2.LookupRequest(key=key(), single_flight=True,
                                                    wait_ms=5000), timeout=10)

    with ThreadPoolExecutor(5) as pool:
        waiting = [pool.submit(wait, i) for i in range(5)]
        time.sleep(0.3)
        assert not any(f.done() for f in waiting)
        cache.Store(cache_pb2.CacheStoreRequest(key=key(), answer=answer(),
                                                lease_id=first.lease_id), timeout=5)
        shared = [f.result(timeout=10) for f in waiting]
    assert all(r.hit and r.shared and r.answer.text == "hello world" for r in shared)


def test_a_released_lease_passes_to_one_waiter(cache) -> None:
    first = cache.Lookup(cache_pb2.LookupRequest(key=key(), single_flight=True), timeout=5)
    with ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(cache.Lookup, cache_pb2.LookupRequest(
            key=key(), single_flight=True, wait_ms=5000), timeout=10)
        time.sleep(0.2)
        cache.Release(cache_pb2.ReleaseRequest(key=key(), lease_id=first.lease_id), timeout=5)
        took_over = waiter.result(timeout=10)
    assert not took_over.hit and took_over.lease_id and took_over.lease_id != first.lease_id
    # Without wait_ms, a held lease is a plain miss.
    plain = cache.Lookup(cache_pb2.LookupRequest(key=key(), single_flight=True), timeout=5)
    assert not plain.hit and not plain.lease_id


def test_invalidation_by_tenant_and_by_version(cache) -> None:
    for k in (key("a", "v1"), key("a", "v2"), key("b", "v1"), key("b", "v2")):
        cache.Store(cache_pb2.CacheStoreRequest(key=k, answer=answer()), timeout=5)
    removed = cache.Invalidate(cache_pb2.InvalidateRequest(model_version="v1"), timeout=5)
    assert removed.num_removed == 2
    assert cache.Invalidate(cache_pb2.InvalidateRequest(tenant="a"), timeout=5).num_removed == 1
    assert [cache.Lookup(cache_pb2.LookupRequest(key=k), timeout=5).hit
            for k in (key("a", "v1"), key("a", "v2"), key("b", "v1"), key("b", "v2"))] == [
        False, False, False, True]


@pytest.mark.parametrize(("call", "request_", "message"), [
    ("Lookup", cache_pb2.LookupRequest(key=cache_pb2.CacheKey(model="m", model_version="v1")),
     "prompt_ids is empty"),
    ("Lookup", cache_pb2.LookupRequest(key=cache_pb2.CacheKey(model="m", prompt_ids=[1])),
     "model_version is empty"),
    ("Invalidate", cache_pb2.InvalidateRequest(), "set tenant, model_version or both"),
    ("Release", cache_pb2.ReleaseRequest(key=key()), "lease_id is empty"),
])
def test_bad_requests_are_invalid_argument(shared_cache, call, request_, message) -> None:
    with pytest.raises(grpc.RpcError) as err:
        getattr(shared_cache, call)(request_, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_redis_down_is_unavailable_at_once_and_the_cache_recovers(
        redis_server: RedisServer, tmp_path: Path) -> None:
    port = free_port()
    with service("services.cache.main", ["--port", str(port), "--redis-url", redis_server.url],
                 port=port, log_path=tmp_path / "cache.log"), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = cache_pb2_grpc.CacheStub(channel)
        stub.Store(cache_pb2.CacheStoreRequest(key=key(), answer=answer()), timeout=5)
        assert stub.Lookup(cache_pb2.LookupRequest(key=key()), timeout=5).hit
        redis_server.kill()
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Lookup(cache_pb2.LookupRequest(key=key()), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "bypass the cache" in err.value.details()
        assert time.monotonic() - t0 < 1.0
        assert stub.GetStats(cache_pb2.CacheStatsRequest(), timeout=5).num_store_errors >= 1
        redis_server.start()  # back, empty
        assert not stub.Lookup(cache_pb2.LookupRequest(key=key()), timeout=5).hit
        stub.Store(cache_pb2.CacheStoreRequest(key=key(), answer=answer()), timeout=5)
        assert stub.Lookup(cache_pb2.LookupRequest(key=key()), timeout=5).hit
