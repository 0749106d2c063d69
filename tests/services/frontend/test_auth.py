"""The edge's key check (ext_authz Check): one known key passes as its tenant, none or an
unknown one passes with no tenant, two are refused; keys are held and compared hashed."""

from __future__ import annotations

import asyncio
import hashlib
import json

import grpc

from genmesh.authz.v3 import external_auth_pb2 as authz
from genmesh.authz.v3 import external_auth_pb2_grpc as authz_grpc
from services.common.server import new_server
from services.frontend.auth import AuthorizationServicer, KeyRing, Verdict, check, verdict

KEYS = KeyRing.of({"dev": ["dev-key", "dev-key-2"], "other": ["other-key"]})
OVERWRITE = authz.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
GRPC_PATH = "/genmesh.v1.Generation/Generate"


def request(path: str = GRPC_PATH, **headers: str) -> authz.CheckRequest:
    http = authz.AttributeContext.HttpRequest(path=path, headers=headers)
    return authz.CheckRequest(attributes=authz.AttributeContext(
        request=authz.AttributeContext.Request(http=http)))


def answer(path: str = GRPC_PATH, **headers: str) -> Verdict:
    return verdict(KEYS, headers, key_header="x-api-key", path=path)


def test_the_ring_holds_digests_and_finds_each_key_s_tenant():
    assert KEYS.digests[0] == (hashlib.sha256(b"dev-key").digest(), "dev")
    assert b"dev-key" not in b"".join(d for d, _ in KEYS.digests)
    assert [KEYS.tenant(k) for k in ("dev-key", "dev-key-2", "other-key", "dev", "")] == [
        "dev", "dev", "other", None, None]


def test_one_key_is_its_tenant_none_or_an_unknown_one_is_no_tenant():
    assert answer(**{"x-api-key": "dev-key"}) == Verdict(tenant="dev")
    assert answer(**{"x-api-key": "nope"}) == Verdict()
    assert answer() == Verdict()
    # On gRPC paths Authorization is not a credential (only the HTTP API's paths take it).
    assert answer(authorization="Bearer other-key") == Verdict()
    assert answer("/v1/chat/completions", authorization="Bearer other-key") == Verdict(
        tenant="other")
    assert answer("/v1/models", authorization="bearer other-key") == Verdict(tenant="other")


def test_two_keys_are_refused_whatever_their_order_or_header():
    two = "this request carries 2 API keys; send exactly one, in 'x-api-key'"
    # Envoy joins a header sent twice with ",".
    assert answer(**{"x-api-key": "wrong,dev-key"}) == Verdict(refusal=two)
    assert answer(**{"x-api-key": "dev-key,wrong"}) == Verdict(refusal=two)
    assert answer(**{"x-api-key": "dev-key,dev-key"}) == Verdict(refusal=two)
    assert answer("/v1/models", **{"x-api-key": "dev-key",
                                   "authorization": "Bearer dev-key"}) == Verdict(refusal=(
        "this request carries 2 API keys; send exactly one, in 'x-api-key' or "
        "'Authorization: Bearer'"))


def test_check_stamps_the_tenant_and_removes_every_credential():
    ok = check(KEYS, request(**{"x-api-key": "dev-key"}), key_header="x-api-key")
    assert ok == authz.CheckResponse(status=authz.Status(), ok_response=authz.OkHttpResponse(
        headers=[authz.HeaderValueOption(header=authz.HeaderValue(
            key="x-genmesh-tenant", value="dev"), append_action=OVERWRITE)],
        headers_to_remove=["x-api-key", "authorization"]))
    # No tenant: whatever tenant header the client sent is removed too.
    anonymous = check(KEYS, request(**{"x-genmesh-tenant": "dev"}), key_header="x-api-key")
    assert anonymous.ok_response == authz.OkHttpResponse(
        headers_to_remove=["x-genmesh-tenant", "x-api-key", "authorization"])


def test_check_refuses_two_keys_as_unauthenticated_in_each_door_s_terms():
    refused = check(KEYS, request(**{"x-api-key": "a,b"}), key_header="x-api-key")
    assert refused.status.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert refused.denied_response.status.code == authz.Unauthorized == 401
    assert refused.denied_response.body == (
        "this request carries 2 API keys; send exactly one, in 'x-api-key'")
    http = check(KEYS, request("/v1/models", **{"x-api-key": "a", "authorization": "Bearer b"}),
                 key_header="x-api-key").denied_response
    assert json.loads(http.body)["error"]["code"] == "invalid_api_key"
    assert [(h.header.key, h.header.value) for h in http.headers] == [
        ("content-type", "application/json")]


def test_the_servicer_answers_check_over_grpc():
    async def call() -> authz.CheckResponse:
        server = new_server()
        authz_grpc.add_AuthorizationServicer_to_server(
            AuthorizationServicer(KEYS, key_header="x-api-key"), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await authz_grpc.AuthorizationStub(channel).Check(
                    request(**{"x-api-key": "other-key"}))
        finally:
            await server.stop(None)

    reply = asyncio.run(call())
    assert reply.ok_response.headers[0].header.value == "other"
