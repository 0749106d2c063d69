"""The RateLimitService over gRPC, in-process, against a real redis-server."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from genmesh.rls.v3 import rls_pb2, rls_pb2_grpc
from tests.procs import free_port, service
from tests.services.ratelimit.conftest import T0, ratelimit_stub

OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
MINUTE = rls_pb2.RateLimitResponse.RateLimit.MINUTE
SECOND = rls_pb2.RateLimitResponse.RateLimit.SECOND

LIMITS = """\
domain: genmesh
descriptors:
  - key: tenant
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: tenant
    value: alice
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: tenant
    value: fast
    rate_limit: {unit: second, requests_per_unit: 2}
"""


@pytest.fixture
def limits_file(tmp_path) -> Path:
    path = tmp_path / "limits.yaml"
    path.write_text(LIMITS)
    return path


def descriptor(*entries: tuple[str, str], override: tuple[int, int] | None = None
               ) -> rls_pb2.RateLimitDescriptor:
    d = rls_pb2.RateLimitDescriptor(entries=[
        rls_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries])
    if override is not None:
        d.limit.requests_per_unit, d.limit.unit = override
    return d


def tenant(name: str) -> rls_pb2.RateLimitDescriptor:
    return descriptor(("tenant", name))


def request(*descriptors: rls_pb2.RateLimitDescriptor, domain: str = "genmesh",
            hits_addend: int = 0) -> rls_pb2.RateLimitRequest:
    return rls_pb2.RateLimitRequest(domain=domain, descriptors=descriptors,
                                    hits_addend=hits_addend)


async def codes(stub, req: rls_pb2.RateLimitRequest, n: int) -> list[int]:
    return [(await stub.ShouldRateLimit(req, timeout=5)).overall_code for _ in range(n)]


def test_under_the_limit_ok_then_over_limit_with_headers_fields(redis_server, limits_file):
    async def main() -> None:
        async with ratelimit_stub(limits_file, redis_server.url, clock=lambda: T0) as stub:
            first = await stub.ShouldRateLimit(request(tenant("bob")), timeout=5)
            assert first.overall_code == OK
            [status] = first.statuses
            assert status.code == OK
            assert status.current_limit == rls_pb2.RateLimitResponse.RateLimit(
                name="tenant", requests_per_unit=3, unit=MINUTE)
            assert status.limit_remaining == 2
            assert status.duration_until_reset.ToTimedelta().total_seconds() == 50

            assert await codes(stub, request(tenant("bob")), 2) == [OK, OK]
            over = await stub.ShouldRateLimit(request(tenant("bob")), timeout=5)
            assert over.overall_code == OVER_LIMIT
            [status] = over.statuses
            assert status.code == OVER_LIMIT
            assert status.current_limit.requests_per_unit == 3
            assert status.limit_remaining == 0
            assert status.duration_until_reset.seconds == 50
    asyncio.run(main())


def test_over_the_limit_the_reply_names_the_limit_and_when_its_window_ends(redis_server,
                                                                          limits_file):
    """The body (Envoy's 429, a gRPC client's grpc-message) names the limit and the whole
    seconds to wait, rounded up; the headers describe the same limit."""
    async def main() -> None:
        async with ratelimit_stub(limits_file, redis_server.url,
                                  clock=lambda: T0 + 0.3) as stub:
            replies = [await stub.ShouldRateLimit(request(tenant("bob")), timeout=5)
                       for _ in range(4)]
            for ok in replies[:3]:  # nothing to say while under the limit
                assert (ok.raw_body, list(ok.response_headers_to_add)) == (b"", [])
            over = replies[3]
            assert over.overall_code == OVER_LIMIT
            assert over.raw_body.decode() == (
                "tenant 'bob' is over its requests_per_minute limit of 3, shared by all "
                "gateways; retry in 50 s")
            assert [(h.key, h.value) for h in over.response_headers_to_add] == [
                ("x-ratelimit-limit", "3"), ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "50"), ("retry-after", "50")]
            assert over.statuses[0].duration_until_reset.ToTimedelta().total_seconds() == 49.7
    asyncio.run(main())


def test_over_several_limits_the_reply_names_the_one_that_ends_last(redis_server,
                                                                    limits_file):
    async def main() -> None:
        async with ratelimit_stub(limits_file, redis_server.url, clock=lambda: T0) as stub:
            both = request(tenant("fast"), descriptor(("tenant", "bob"), ("path", "/x"),
                                                      override=(1, rls_pb2.HOUR)))
            await stub.ShouldRateLimit(both, timeout=5)
            await stub.ShouldRateLimit(both, timeout=5)
            over = await stub.ShouldRateLimit(both, timeout=5)
            assert [s.code for s in over.statuses] == [OVER_LIMIT, OVER_LIMIT]
            assert over.raw_body.decode() == (
                "tenant 'bob', path '/x' is over its requests_per_hour limit of 1, shared by "
                "all gateways; retry in 3590 s")
            assert [(h.key, h.value) for h in over.response_headers_to_add] == [
                ("x-ratelimit-limit", "1"), ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "3590"), ("retry-after", "3590")]
    asyncio.run(main())


def test_any_descriptor_over_makes_the_request_over(redis_server, limits_file):
    async def main() -> None:
        async with ratelimit_stub(limits_file, redis_server.url, clock=lambda: T0) as stub:
            await codes(stub, request(tenant("bob")), 3)
            reply = await stub.ShouldRateLimit(
                request(tenant("carol"), tenant("bob"), descriptor(("user", "x"))), timeout=5)
            assert reply.overall_code == OVER_LIMIT
            assert [s.code for s in reply.statuses] == [OK, OVER_LIMIT, OK]
            # No limit for ("user", "x"): OK, without a limit or a reset time.
            assert not reply.statuses[2].HasField("current_limit")
            assert not reply.statuses[2].HasField("duration_until_reset")
    asyncio.run(main())


def test_two_services_on_one_redis_share_the_count(redis_server, limits_file):
    async def main() -> None:
        async with ratelimit_stub(limits_file, redis_server.url, clock=lambda: T0) as one, \
                ratelimit_stub(limits_file, redis_server.url, clock=lambda: T0) as two:
            replies = [await stub.ShouldRateLimit(request(tenant("bob")), timeout=5)
                       for stub in (one, two, one, two)]
            assert [r.overall_code for r in replies] == [OK, OK, OK, OVER_LIMIT]
            assert [r.statuses[0].limit_remaining for r in replies] == [2, 1, 0, 0]
    asyncio.run(main())


def test_a_valueless_descriptor_counts_each_value_apart(redis_server, limits_file):
    async def main() -> None:
        async with ratelimit_stub(limits_file, redis_server.url, clock=lambda: T0) as stub:
            assert await codes(stub, request(tenant("bob")), 4) == [OK, OK, OK, OVER_LIMIT]
            assert await codes(stub, request(tenant("carol")), 4) == [OK, OK, OK, OVER_LIMIT]
            # alice has her own item and limit, which wins over the valueless one.
            assert await codes(stub, request(tenant("alice")), 6) == [OK] * 5 + [OVER_LIMIT]
            reply = await stub.ShouldRateLimit(request(tenant("alice")), timeout=5)
            assert reply.statuses[0].current_limit.name == "tenant=alice"
    asyncio.run(main())


def test_hits_addend(redis_server, limits_file):
    async def main() -> None:
        async with ratelimit_stub(limits_file, redis_server.url, clock=lambda: T0) as stub:
            reply = await stub.ShouldRateLimit(request(tenant("alice"), hits_addend=4),
                                               timeout=5)
            assert (reply.overall_code, reply.statuses[0].limit_remaining) == (OK, 1)
            reply = await stub.ShouldRateLimit(request(tenant("alice"), hits_addend=2),
                                               timeout=5)
            assert (reply.overall_code, reply.statuses[0].limit_remaining) == (OVER_LIMIT, 0)
    asyncio.run(main())


def test_a_limit_override_from_envoy(redis_server, limits_file):
    async def main() -> None:
        async with ratelimit_stub(limits_file, redis_server.url, clock=lambda: T0) as stub:
            req = request(descriptor(("user", "x"), override=(1, rls_pb2.HOUR)))
            [first, second] = [await stub.ShouldRateLimit(req, timeout=5) for _ in range(2)]
            assert [first.overall_code, second.overall_code] == [OK, OVER_LIMIT]
            assert first.statuses[0].current_limit == rls_pb2.RateLimitResponse.RateLimit(
                requests_per_unit=1, unit=rls_pb2.RateLimitResponse.RateLimit.HOUR)
            assert first.statuses[0].duration_until_reset.seconds == 3590
    asyncio.run(main())


def test_windows_follow_the_redis_clock(redis_server, limits_file):
    """A second window ends when Redis's clock says so, and the count restarts."""
    async def main() -> None:
        async with ratelimit_stub(limits_file, redis_server.url) as stub:
            first = await stub.ShouldRateLimit(request(tenant("fast")), timeout=5)
            reset_s = first.statuses[0].duration_until_reset.ToTimedelta().total_seconds()
            assert 0 < reset_s <= 1
            await asyncio.sleep(reset_s + 0.02)  # the start of the next window
            assert await codes(stub, request(tenant("fast")), 3) == [OK, OK, OVER_LIMIT]
            reply = await stub.ShouldRateLimit(request(tenant("fast")), timeout=5)
            await asyncio.sleep(reply.statuses[0].duration_until_reset.ToTimedelta()
                                .total_seconds() + 0.02)
            reply = await stub.ShouldRateLimit(request(tenant("fast")), timeout=5)
            assert (reply.overall_code, reply.statuses[0].limit_remaining) == (OK, 1)
            assert reply.statuses[0].current_limit.unit == SECOND
    asyncio.run(main())


def test_reloads_a_limits_file_renamed_over_the_old(redis_server, limits_file):
    async def main() -> None:
        async with ratelimit_stub(limits_file, redis_server.url, clock=lambda: T0) as stub:
            assert await codes(stub, request(tenant("bob")), 2) == [OK, OK]
            new = limits_file.with_suffix(".new")
            new.write_text(LIMITS.replace("requests_per_unit: 3", "requests_per_unit: 2"))
            os.replace(new, limits_file)
            reply = await stub.ShouldRateLimit(request(tenant("bob")), timeout=5)
            assert reply.overall_code == OVER_LIMIT  # the third hit, over the new 2
            assert reply.statuses[0].current_limit.requests_per_unit == 2

            new.write_text("domain: genmesh\ndescriptors: [{key: tenant, rate_limit: {}}]\n")
            os.replace(new, limits_file)  # a bad file: the limits of the last good one stay
            reply = await stub.ShouldRateLimit(request(tenant("carol")), timeout=5)
            assert reply.statuses[0].current_limit.requests_per_unit == 2
    asyncio.run(main())


def test_other_domains_are_not_limited_and_need_no_redis(redis_server, limits_file):
    async def main() -> None:
        async with ratelimit_stub(limits_file, redis_server.url, clock=lambda: T0) as stub:
            redis_server.kill()
            for domain in ("", "other"):
                reply = await stub.ShouldRateLimit(
                    request(tenant("bob"), tenant("alice"), domain=domain), timeout=5)
                assert reply.overall_code == OK
                assert [s.code for s in reply.statuses] == [OK, OK]
                assert not reply.statuses[0].HasField("current_limit")
    asyncio.run(main())


@pytest.mark.parametrize(("req", "message"), [
    (request(), "descriptors is empty"),
    (request(descriptor()), "descriptors[0].entries is empty"),
    (request(tenant("a"), descriptor(("tenant", ""))),
     "descriptors[1].entries[0]: key and value must not be empty"),
    (request(descriptor(("", "x"))), "key and value must not be empty"),
    (request(descriptor(("k", "v"), override=(0, rls_pb2.SECOND))), "descriptors[0].limit"),
    (request(descriptor(("k", "v"), override=(5, rls_pb2.UNKNOWN))), "needs a unit"),
])
def test_malformed_requests_are_invalid_arguments(redis_server, limits_file, req, message):
    async def main() -> None:
        async with ratelimit_stub(limits_file, redis_server.url) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ShouldRateLimit(req, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in err.value.details()
    asyncio.run(main())


async def unavailable_within(stub, seconds: float) -> str:
    t0 = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ShouldRateLimit(request(tenant("bob")), timeout=5)
    assert time.monotonic() - t0 < seconds
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    return err.value.details()


def test_redis_killed_is_unavailable_then_recovers(redis_server, limits_file):
    async def main() -> None:
        async with ratelimit_stub(limits_file, redis_server.url, clock=lambda: T0) as stub:
            assert await codes(stub, request(tenant("bob")), 1) == [OK]
            redis_server.kill()
            details = await unavailable_within(stub, 1.0)
            assert "rate-limit counters unavailable (Redis at 127.0.0.1:" in details
            await unavailable_within(stub, 1.0)
            redis_server.start()  # empty: no counts, no script
            assert await codes(stub, request(tenant("bob")), 4) == [OK, OK, OK, OVER_LIMIT]
            # Restarted again without a failed call in between: the pool reconnects.
            redis_server.kill()
            redis_server.start()
            assert await codes(stub, request(tenant("bob")), 1) == [OK]
    asyncio.run(main())


def test_redis_too_slow_is_unavailable_then_recovers(redis_server, limits_file):
    async def main() -> None:
        async with ratelimit_stub(limits_file, redis_server.url, clock=lambda: T0,
                                  timeout_s=0.25) as stub:
            assert await codes(stub, request(tenant("bob")), 1) == [OK]
            redis_server.pause()
            details = await unavailable_within(stub, 1.0)
            assert "no answer within 0.25 s" in details
            redis_server.resume()
            # Redis may yet run the command it was sent: the unanswered hit may count.
            assert await codes(stub, request(tenant("bob")), 3) in (
                [OK, OK, OVER_LIMIT], [OK, OVER_LIMIT, OVER_LIMIT])
    asyncio.run(main())


def test_the_entry_point_serves_health_reflection_and_limits(redis_server, limits_file,
                                                             tmp_path):
    port = free_port()
    args = ["--port", str(port), "--limits-file", str(limits_file),
            "--redis-url", redis_server.url]
    with service("services.ratelimit.main", args, port=port,
                 log_path=tmp_path / "ratelimit.log"), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        name = "envoy.service.ratelimit.v3.RateLimitService"
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        [listed] = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        assert name in {s.name for s in listed.list_services_response.service}
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        reply = stub.ShouldRateLimit(request(tenant("alice"), hits_addend=5), timeout=5)
        assert (reply.overall_code, reply.statuses[0].limit_remaining) == (OK, 0)
