"""A real Envoy, rendered by gateway.envoy, in front of a stand-in for the HTTP API.

The stand-in (a stdlib HTTP server) answers ``GET /healthz`` with 200 and any ``/v1/``
request with the headers it received, as JSON; nothing listens on the gRPC services'
ports, which these tests never reach.
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from genmesh.core.deployment import (
    Deployment,
    GatewaySettings,
    ModelVersion,
    Rollout,
    Services,
    Tenant,
)
from tests.gateway.key_check import start_key_check
from tests.gateway.test_envoy_e2e import running_envoy, wait_until
from tests.procs import free_port

DEV_KEY = "dev-key"
BURST_KEY = "burst-key"
BURST_REQUESTS_PER_SECOND = 3
SHARED_KEY = "shared-key"  # a tenant whose bucket these tests spend on all three routes
SHARED_REQUESTS_PER_SECOND = 3
GRPC = {"content-type": "application/grpc", "te": "trailers"}
MAX_REQUEST_BYTES = 4096
REQUEST_TIMEOUT_S = 5.0


class EchoHeaders(BaseHTTPRequestHandler):
    """``/healthz``: 200; ``/v1/...``: 200 with the request's headers as a JSON object.

    HTTP/1.0 (BaseHTTPRequestHandler's default): one request per connection, so a stopped
    server leaves no open connection behind for Envoy to reuse."""

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._reply(200, b"ok", "text/plain")
        else:
            self._echo()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self._echo()

    def _echo(self) -> None:
        if not self.path.startswith("/v1/"):
            self._reply(404, b"not found", "text/plain")
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        self._reply(200, json.dumps(headers).encode(), "application/json")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet: no line per request
        pass


class Backend:
    """The stand-in HTTP API on a fixed port, which can be stopped and started again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), EchoHeaders)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Gateway:
    cfg: Deployment
    backend: Backend

    def request(self, path: str, *, headers: dict[str, str] | None = None,
                body: bytes | None = None) -> Reply:
        """One request to the edge on a connection of its own."""
        conn = http.client.HTTPConnection("127.0.0.1", self.cfg.gateway.edge_port,
                                          timeout=REQUEST_TIMEOUT_S)
        try:
            conn.request("GET" if body is None else "POST", path, body=body,
                         headers=headers or {})
            response = conn.getresponse()
            return Reply(response.status,
                         {name.lower(): value for name, value in response.getheaders()},
                         response.read())
        finally:
            conn.close()

    def received(self, **headers: str) -> dict[str, str]:
        """The headers the backend received for a chat completion sent with ``headers``."""
        reply = self.request("/v1/chat/completions", headers=headers, body=b"{}")
        assert reply.status == 200, reply
        return reply.json()


def make_config(backend_port: int) -> Deployment:
    """A deployment with the HTTP API at ``backend_port`` and two tenants; nothing listens
    on the gRPC services' ports."""
    return Deployment(
        model="m", versions=(ModelVersion("v1", (("127.0.0.1", free_port()),)),),
        rollout=Rollout(primary="v1"),
        services=Services(frontend=(("127.0.0.1", free_port()),),
                          tokenizer=(("127.0.0.1", free_port()),),
                          httpapi=(("127.0.0.1", backend_port),)),
        tenants=(Tenant("dev", (DEV_KEY,), requests_per_second=1000),
                 Tenant("burst", (BURST_KEY,), requests_per_second=BURST_REQUESTS_PER_SECOND),
                 Tenant("shared", (SHARED_KEY,),
                        requests_per_second=SHARED_REQUESTS_PER_SECOND)),
        gateway=GatewaySettings(edge_port=free_port(), mesh_port=free_port(),
                                admin_port=free_port(), max_request_bytes=MAX_REQUEST_BYTES,
                                access_log=False))


def wait_routed(gw: Gateway) -> None:
    """Envoy routes to the backend once a health probe passed (anonymous: no bucket spent)."""
    def routed() -> None:
        assert gw.request("/v1/models").status == 200

    wait_until(routed, timeout=5, what="the HTTP API not reachable through envoy")


@pytest.fixture(scope="module")
def gw(tmp_path_factory) -> Iterator[Gateway]:
    backend = Backend(free_port())
    backend.start()
    cfg = make_config(backend.port)
    # The edge asks the frontend's key check before it routes a request.
    key_check = start_key_check(cfg.tenants, port=cfg.services.frontend[0][1])
    try:
        with running_envoy(cfg, tmp_path_factory.mktemp("envoy")):
            gateway = Gateway(cfg, backend)
            wait_routed(gateway)
            yield gateway
    finally:
        key_check.stop(grace=None)
        backend.stop()


@pytest.mark.parametrize("credential", [{"Authorization": f"Bearer {DEV_KEY}"},
                                        {"x-api-key": DEV_KEY}])
def test_a_tenant_key_reaches_the_http_api_as_the_tenant_without_the_key(gw, credential):
    received = gw.received(**credential)
    assert received["x-genmesh-tenant"] == "dev"
    assert "authorization" not in received and "x-api-key" not in received


@pytest.mark.parametrize("credential", [
    {},
    {"Authorization": "Bearer not-a-key"},
    {"Authorization": f"Basic {DEV_KEY}"},  # the key, but not as a Bearer token
    {"x-api-key": "not-a-key"},
])
def test_no_or_an_unknown_key_reaches_the_http_api_with_no_tenant(gw, credential):
    received = gw.received(**credential)
    assert "x-genmesh-tenant" not in received
    assert "authorization" not in received and "x-api-key" not in received


def test_a_tenant_header_from_the_client_is_never_believed(gw):
    as_dev = gw.received(**{"Authorization": f"Bearer {DEV_KEY}", "x-genmesh-tenant": "evil"})
    assert as_dev["x-genmesh-tenant"] == "dev"
    anonymous = gw.received(**{"x-genmesh-tenant": "evil"})
    assert "x-genmesh-tenant" not in anonymous


def test_over_the_tenants_rate_the_reply_is_an_openai_rate_limit_error(gw):
    bearer = {"Authorization": f"Bearer {BURST_KEY}"}
    # The bucket holds one second's worth: a burst of twice that at once runs it dry.
    with ThreadPoolExecutor(2 * BURST_REQUESTS_PER_SECOND + 1) as pool:
        replies = list(pool.map(lambda _: gw.request("/v1/models", headers=bearer),
                                range(2 * BURST_REQUESTS_PER_SECOND + 1)))
    limited = [r for r in replies if r.status == 429]
    assert limited, [r.status for r in replies]
    reply = limited[0]
    assert reply.headers["retry-after"] == "1"
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {"error": {
        "message": f"tenant 'burst' is over its requests_per_second limit of "
                   f"{BURST_REQUESTS_PER_SECOND} at this gateway; retry in 1 s",
        "type": "requests", "param": None, "code": "rate_limit_exceeded"}}


def test_a_tenants_grpc_bearer_and_key_header_routes_share_one_bucket(gw):
    routes = {
        "grpc": ("/genmesh.v1.Generation/ListModels", GRPC | {"x-api-key": SHARED_KEY}),
        "bearer": ("/v1/models", {"Authorization": f"Bearer {SHARED_KEY}"}),
        "key": ("/v1/models", {"x-api-key": SHARED_KEY}),
    }
    # Three rounds of one request on each route. A bucket per route (3 tokens each) would
    # admit all nine; the tenant's one bucket admits 3, and 3 more at most if it refills
    # once meanwhile (the nine, sent at once, take well under its 1 s fill interval).
    calls = [(name, path, headers) for _ in range(3) for name, (path, headers) in routes.items()]
    with ThreadPoolExecutor(len(calls)) as pool:
        replies = list(pool.map(lambda c: (c[0], gw.request(
            c[1], headers=c[2], body=b"" if c[0] == "grpc" else None)), calls))
    limited = [(name, r) for name, r in replies if r.headers.get("x-genmesh-rate-limited-by")]
    assert len(limited) >= len(replies) - 2 * SHARED_REQUESTS_PER_SECOND, [
        (name, r.status, r.headers.get("grpc-status")) for name, r in replies]
    for name, reply in limited:  # each answered in its own protocol's terms
        assert reply.headers["x-genmesh-rate-limited-by"] == "local"
        if name == "grpc":
            assert reply.headers["grpc-status"] == "8"  # RESOURCE_EXHAUSTED
        else:
            assert (reply.status, reply.headers["retry-after"]) == (429, "1")
            assert reply.json()["error"]["code"] == "rate_limit_exceeded"
    # Counted under the tenant's own stat prefix, which only its nine requests reached.
    stats = admin_stats(gw, "tenant_shared.http_local_rate_limit.")
    assert stats["tenant_shared.http_local_rate_limit.enabled"] == len(replies)
    assert stats["tenant_shared.http_local_rate_limit.rate_limited"] == len(limited)


def admin_stats(gw: Gateway, prefix: str) -> dict[str, int]:
    """Envoy's counters whose names start with ``prefix``, from its admin interface."""
    url = f"http://127.0.0.1:{gw.cfg.gateway.admin_port}/stats?filter=^{prefix}"
    with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT_S) as reply:
        lines = reply.read().decode().splitlines()
    return {name: int(value) for name, value in (line.split(": ") for line in lines)}


def test_a_body_over_the_limit_is_an_openai_invalid_request_error(gw):
    reply = gw.request("/v1/chat/completions", headers={"x-api-key": DEV_KEY},
                       body=b"x" * (MAX_REQUEST_BYTES + 1))
    assert reply.status == 413
    assert reply.json()["error"] == {
        "message": f"request body larger than {MAX_REQUEST_BYTES} bytes, the gateway's limit "
                   "(max_request_bytes)",
        "type": "invalid_request_error", "param": None, "code": "request_too_large"}


def test_other_paths_keep_envoys_plain_replies(gw):
    reply = gw.request("/healthz")  # the HTTP API's own probe path is not public
    assert reply.status == 404
    assert b"the OpenAI-compatible HTTP API (/v1/)" in reply.body
    # gRPC calls are still answered in gRPC's terms: a frontend (here a stand-in that
    # serves only the key check) that does not serve the call, a body over the limit.
    unavailable = gw.request("/genmesh.v1.Generation/Generate", body=b"", headers=GRPC)
    assert unavailable.headers["grpc-status"] == "12"  # UNIMPLEMENTED
    too_large = gw.request("/genmesh.v1.Generation/Generate", headers=GRPC,
                           body=b"x" * (MAX_REQUEST_BYTES + 1))
    assert too_large.headers["grpc-status"] == "8"  # RESOURCE_EXHAUSTED
    assert "max_request_bytes" in too_large.headers["grpc-message"]
    assert all("json" not in r.headers["content-type"] for r in (unavailable, too_large))


def test_a_stopped_http_api_is_an_openai_service_unavailable_error(gw):
    gw.backend.stop()
    try:
        reply = gw.request("/v1/models", headers={"x-api-key": DEV_KEY})
        assert reply.status == 503
        assert reply.headers["retry-after"] == "1"
        error = reply.json()["error"]
        assert (error["type"], error["param"], error["code"]) == (
            "server_error", None, "service_unavailable")
        assert error["message"].startswith("the HTTP API service is unavailable (")
    finally:
        gw.backend.start()
    wait_routed(gw)  # back at its next good probe
