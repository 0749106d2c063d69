"""Routes of both listeners, built from the deployment.

Edge (clients → frontend, and → the HTTP API when deployed):
- health and reflection pass without a key;
- every other request is first checked by the ext_authz filter (``gateway/authz.py``):
  the frontend's Check stamps ``x-genmesh-tenant`` for one known API key (overwriting
  whatever the client sent), removes it otherwise, removes the credentials, and refuses
  a request with more than one key (UNAUTHENTICATED, 401). No key is in this config.
- one route per tenant matches ``genmesh.v1.Generation`` calls stamped with the tenant's
  name and carries its global descriptor; the tenant's local bucket counts every request
  stamped with its name (``gateway/ratelimits.py``); the route drops the credentials
  again (they never reach a backend or a log);
- any other Generation call (no key, an unknown key) reaches the frontend with no
  tenant header, and the frontend answers UNAUTHENTICATED.
- With ``services.httpapi``, the OpenAI-compatible HTTP API (``/v1/``, HTTP/1.1) is
  authenticated the same way, its key as ``Authorization: Bearer <key>`` (what OpenAI's
  SDKs send) or in the API key header: per tenant one route, then any other ``/v1/``
  request reaches the HTTP API with no tenant (nor credential), which answers 401. The
  tenant's ``requests_per_second`` is one bucket over both doors; the global limit is
  one counter.

Mesh (frontend → internal services):
- Tokenizer: its unary calls are retried on a refused or reset connection (they are
  idempotent); the Detokenize stream is not.
- Worker: a call pinned to a version (``x-genmesh-model-version``) goes to that version's
  pool; any other is split between primary and candidate by the rollout's weights, per
  request or by the tenant's stable hash (``x-genmesh-ab-bucket``, set by the frontend).
  Generate calls are mirrored to the candidate for the shadow share, and hashed on
  ``x-genmesh-prefix-key`` (the prompt's first full KV blocks, set by the frontend) so a
  shared prefix keeps reaching the replica that caches it.

Timeouts: ``timeout: 0s`` on every route, the caller's gRPC deadline rules (see ``route``);
an HTTP API request is bounded by the stream idle timeout and the service's own limit.
Unknown paths get HTTP 404, which gRPC reads as UNIMPLEMENTED, naming what is served.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway import ratelimits
from gateway.authz import AUTHORIZATION
from genmesh.core import metadata
from genmesh.core.deployment import Deployment, SplitMode, Tenant

WEIGHT_SCALE = 10_000  # weights are in hundredths of a percent
# Methods safe to retry: they change nothing and answer from a fixed input.
IDEMPOTENT_TOKENIZER_METHODS = ("Tokenize", "ApplyChatTemplate", "DescribeModel")
RETRY_ON = "connect-failure,refused-stream,reset,unavailable"
NUM_RETRIES = 2
HTTP_API_PREFIX = "/v1/"  # the OpenAI-compatible paths, served by services/httpapi
GENERATION = "genmesh.v1.Generation"  # the public service, on the mesh for the HTTP API


def route(prefix: str, cluster: str) -> dict[str, Any]:
    """Send every path starting with ``prefix`` to ``cluster``. No Envoy timeout: the
    caller's gRPC deadline rules. Envoy forwards ``grpc-timeout`` to the backend, and the
    client's own timer ends the call. (Letting Envoy enforce the header too would race
    the client: a stream whose headers were sent is then reset, and the client reads
    INTERNAL instead of DEADLINE_EXCEEDED.)"""
    return {
        "match": {"prefix": prefix},
        "route": {"cluster": cluster, "timeout": "0s"},
    }


def unrouted(listener_name: str, services: Sequence[str]) -> dict[str, Any]:
    """Answer any other path with 404 (gRPC: UNIMPLEMENTED) and say what is served."""
    message = f"genmesh {listener_name}: no route for this path; served here: {', '.join(services)}"
    return {
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": message}},
    }


# ---- edge -----------------------------------------------------------------------------------

def edge_routes(dep: Deployment) -> list[dict[str, Any]]:
    generation = "/genmesh.v1.Generation/"
    key_header = dep.limits.api_key_header
    has_global = bool(dep.services.ratelimit)
    routes = [route("/grpc.health.v1.Health/", "frontend"),
              route("/grpc.reflection.", "frontend")]  # v1 and v1alpha
    routes += [tenant_route(generation, "frontend", t, credentials=[key_header, AUTHORIZATION],
                            has_global=has_global)
               for t in dep.tenants]
    anonymous = route(generation, "frontend")
    anonymous["request_headers_to_remove"] = [metadata.TENANT, key_header]
    routes.append(anonymous)
    served = ["genmesh.v1.Generation", "grpc.health.v1.Health", "grpc.reflection"]
    if dep.services.httpapi:
        routes += http_api_routes(dep)
        served.append(f"the OpenAI-compatible HTTP API ({HTTP_API_PREFIX})")
    return [*routes, unrouted("edge", served)]


def http_api_routes(dep: Deployment) -> list[dict[str, Any]]:
    """``/v1/`` to the HTTP API: per tenant its route, then everyone else with no tenant.
    Both credentials are dropped on every route."""
    key_header = dep.limits.api_key_header
    credentials = [AUTHORIZATION, key_header]
    has_global = bool(dep.services.ratelimit)
    routes = [tenant_route(HTTP_API_PREFIX, "httpapi", t, credentials=credentials,
                           has_global=has_global) for t in dep.tenants]
    anonymous = route(HTTP_API_PREFIX, "httpapi")
    anonymous["request_headers_to_remove"] = [metadata.TENANT, *credentials]
    return [*routes, anonymous]


def tenant_route(prefix: str, cluster: str, tenant: Tenant, *, credentials: Sequence[str],
                 has_global: bool) -> dict[str, Any]:
    """Calls under ``prefix`` that the key check stamped as the tenant's (``gateway/
    authz.py``; a client's own tenant header never survives it): to ``cluster`` with the
    ``credentials`` headers removed, counted by the tenant's global descriptor."""
    r = route(prefix, cluster)
    r["match"]["headers"] = [{"name": metadata.TENANT, "string_match": {"exact": tenant.name}}]
    r["request_headers_to_remove"] = list(credentials)
    if has_global and tenant.requests_per_minute is not None:
        r["route"]["rate_limits"] = ratelimits.tenant_descriptors(tenant)
    return r


# ---- mesh -----------------------------------------------------------------------------------

def mesh_routes(dep: Deployment) -> list[dict[str, Any]]:
    tokenizer = "/genmesh.v1.Tokenizer/"
    routes = [retried(route(f"{tokenizer}{m}", "tokenizer"))
              for m in IDEMPOTENT_TOKENIZER_METHODS]
    routes.append(route(tokenizer, "tokenizer"))
    routes += worker_routes(dep)
    services = ["genmesh.v1.Tokenizer", "genmesh.v1.Worker"]
    for name in ("safety", "cache"):
        if getattr(dep.services, name):
            service = f"genmesh.v1.{name.capitalize()}"
            routes.append(route(f"/{service}/", name))
            services.append(service)
    if dep.services.httpapi:  # its calls to the frontend (gateway/rbac.py: its alone)
        routes.append(route(f"/{GENERATION}/", "frontend"))
        services.append(GENERATION)
    return [*routes, unrouted("mesh", services)]


def worker_routes(dep: Deployment) -> list[dict[str, Any]]:
    worker = "/genmesh.v1.Worker/"
    generate = f"{worker}Generate"
    routes = []
    for v in dep.versions:  # pinned: exactly that version, no split, no mirror
        pinned = hashed(route(worker, v.cluster))
        pinned["match"]["headers"] = [{"name": metadata.MODEL_VERSION,
                                       "string_match": {"exact": v.name}}]
        routes.append(pinned)
    for v in dep.versions:  # routed: the split already chose it (see ROUTED_VERSION)
        routed = mirrored(hashed(route(generate, v.cluster)), dep)
        routed["match"]["headers"] = [{"name": metadata.ROUTED_VERSION,
                                       "string_match": {"exact": v.name}}]
        routes.append(routed)
    main = split(route(generate, dep.rollout.primary), dep)
    main = mirrored(hashed(main), dep)
    routes.append(main)
    routes.append(split(route(worker, dep.rollout.primary), dep))  # GetStats and the rest
    return routes


def split(r: dict[str, Any], dep: Deployment) -> dict[str, Any]:
    """Weighted primary/candidate split when the rollout has a candidate."""
    rollout = dep.rollout
    if rollout.candidate is None:
        r["route"]["cluster"] = dep.version(rollout.primary).cluster
        return r
    to_candidate = canary_weight(rollout.canary_percent)
    weighted: dict[str, Any] = {"clusters": [
        {"name": dep.version(rollout.primary).cluster, "weight": WEIGHT_SCALE - to_candidate},
        {"name": dep.version(rollout.candidate).cluster, "weight": to_candidate}]}
    if rollout.split is SplitMode.TENANT:
        weighted["header_name"] = metadata.AB_BUCKET
    del r["route"]["cluster"]
    r["route"]["weighted_clusters"] = weighted
    return r


def canary_weight(percent: float) -> int:
    return round(percent * WEIGHT_SCALE / 100)


def mirrored(r: dict[str, Any], dep: Deployment) -> dict[str, Any]:
    rollout = dep.rollout
    if rollout.candidate is None or rollout.shadow_percent <= 0:
        return r
    r["route"]["request_mirror_policies"] = [{
        "cluster": dep.version(rollout.candidate).cluster,
        # Tells the shadow's worker to record its answer (which Envoy throws away).
        "request_headers_mutations": [{"append": {
            "header": {"key": metadata.SHADOW, "value": "1"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}],
        "runtime_fraction": {"default_value": {
            "numerator": canary_weight(rollout.shadow_percent), "denominator": "TEN_THOUSAND"}},
    }]
    return r


def hashed(r: dict[str, Any]) -> dict[str, Any]:
    """Consistent hashing on the prompt's prefix key (no header: any replica)."""
    r["route"]["hash_policy"] = [{"header": {"header_name": metadata.PREFIX_KEY}}]
    return r


def retried(r: dict[str, Any]) -> dict[str, Any]:
    r["route"]["retry_policy"] = {"retry_on": RETRY_ON, "num_retries": NUM_RETRIES}
    return r
