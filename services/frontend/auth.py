"""The edge's authentication: Envoy's ext_authz filter asks ``Check`` which tenant a
request's API key belongs to (``protos/genmesh/authz/v3/external_auth.proto``).

Keys stay out of Envoy: its configuration (and so its admin /config_dump) routes on the
tenant header this service stamps, never on a key. Here keys are held as SHA-256
digests and compared with ``hmac.compare_digest`` against every tenant's, so neither a
key nor how much of one matched leaks through the time a check takes.

A request is refused (UNAUTHENTICATED; HTTP 401) when it carries more than one
credential: two ``x-api-key`` values, or, on the HTTP API's paths, an ``x-api-key`` and
an ``Authorization`` header. Which of two keys counts cannot be left to whoever reads
them (before, "wrong then right" passed as the right key's tenant). One known key: the
request passes as that tenant. None, or an unknown key: it passes with no tenant and its
backend answers UNAUTHENTICATED (the HTTP API: 401), in its own terms.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc

from genmesh.authz.v3 import external_auth_pb2 as authz
from genmesh.authz.v3 import external_auth_pb2_grpc as authz_grpc
from genmesh.core import metadata

AUTHORIZATION = "authorization"
BEARER = "bearer "  # compared in lower case: the scheme is case-insensitive (RFC 9110)
HTTP_API_PREFIX = "/v1/"  # where Authorization: Bearer <key> is a credential too
_OVERWRITE = authz.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The tenants' API keys as (SHA-256 digest, tenant) pairs."""

    digests: tuple[tuple[bytes, str], ...]

    @classmethod
    def of(cls, keys: Mapping[str, Iterable[str]]) -> KeyRing:
        """From tenant name → its keys."""
        return cls(tuple((_digest(key), tenant) for tenant, tenant_keys in keys.items()
                         for key in tenant_keys))

    def tenant(self, key: str) -> str | None:
        """The tenant whose key ``key`` is, or None. Every digest is compared, whatever
        matched, each in constant time."""
        digest = _digest(key)
        found = None
        for known, tenant in self.digests:
            if hmac.compare_digest(known, digest):
                found = tenant
        return found


@dataclass(frozen=True, slots=True)
class Verdict:
    """What Check answers: a tenant (empty: none) or a refusal."""

    tenant: str = ""
    refusal: str = ""  # non-empty: refused (UNAUTHENTICATED) with this message


def credentials(headers: Mapping[str, str], *, key_header: str, path: str) -> list[str]:
    """The request's API keys: each ``key_header`` value (Envoy joins repeated headers
    with ","), and on the HTTP API's paths each ``Authorization: Bearer`` one. An
    Authorization of another scheme counts as a credential too: refused beside a key."""
    found = [v.strip() for v in headers.get(key_header, "").split(",") if v.strip()]
    if path.startswith(HTTP_API_PREFIX):
        for value in headers.get(AUTHORIZATION, "").split(","):
            value = value.strip()
            if value:
                is_bearer = value[:len(BEARER)].lower() == BEARER
                found.append(value[len(BEARER):].strip() if is_bearer else value)
    return found


def verdict(keys: KeyRing, headers: Mapping[str, str], *, key_header: str, path: str
            ) -> Verdict:
    found = credentials(headers, key_header=key_header, path=path)
    if len(found) > 1:
        where = (f"'{key_header}' or 'Authorization: Bearer'"
                 if path.startswith(HTTP_API_PREFIX) else f"'{key_header}'")
        return Verdict(refusal=f"this request carries {len(found)} API keys; send exactly "
                               f"one, in {where}")
    if not found:
        return Verdict()
    return Verdict(tenant=keys.tenant(found[0]) or "")


def check(keys: KeyRing, request: authz.CheckRequest, *, key_header: str
          ) -> authz.CheckResponse:
    """Check's answer to ``request``: ``verdict`` as the changes Envoy makes."""
    http = request.attributes.request.http
    answer = verdict(keys, http.headers, key_header=key_header, path=http.path)
    removed = [key_header, AUTHORIZATION]  # no credential reaches a backend
    if answer.refusal:
        return authz.CheckResponse(
            status=authz.Status(code=grpc.StatusCode.UNAUTHENTICATED.value[0],
                                message=answer.refusal),
            denied_response=authz.DeniedHttpResponse(
                status=authz.HttpStatus(code=authz.Unauthorized),
                body=_body(answer.refusal, path=http.path), headers=_json_headers(http.path)))
    if not answer.tenant:
        return authz.CheckResponse(status=authz.Status(), ok_response=authz.OkHttpResponse(
            headers_to_remove=[metadata.TENANT, *removed]))
    return authz.CheckResponse(status=authz.Status(), ok_response=authz.OkHttpResponse(
        headers=[authz.HeaderValueOption(
            header=authz.HeaderValue(key=metadata.TENANT, value=answer.tenant),
            append_action=_OVERWRITE)],
        headers_to_remove=removed))


class AuthorizationServicer(authz_grpc.AuthorizationServicer):
    """Envoy's ext_authz Check, for the edge listener."""

    def __init__(self, keys: KeyRing, *, key_header: str) -> None:
        self.keys = keys
        self.key_header = key_header

    async def Check(self, request: authz.CheckRequest, context: grpc.aio.ServicerContext
                    ) -> authz.CheckResponse:
        return check(self.keys, request, key_header=self.key_header)


def _body(message: str, *, path: str) -> str:
    """The refusal's body: on the HTTP API's paths OpenAI's error object, else the message
    (which a gRPC caller reads as grpc-message)."""
    if not path.startswith(HTTP_API_PREFIX):
        return message
    return json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": "invalid_api_key"}})


def _json_headers(path: str) -> list[authz.HeaderValueOption]:
    if not path.startswith(HTTP_API_PREFIX):
        return []
    return [authz.HeaderValueOption(
        header=authz.HeaderValue(key="content-type", value="application/json"),
        append_action=_OVERWRITE)]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
