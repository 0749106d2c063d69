"""Rate limits at the edge: Envoy's local token buckets per tenant, and the global limit
shared by every gateway replica through the rate-limit service (``services/ratelimit``).

How a gRPC client sees a limit: both filters answer with HTTP 429, which Envoy turns into
RESOURCE_EXHAUSTED (``rate_limited_as_resource_exhausted``; without it the client would
read UNAVAILABLE), with ``x-ratelimit-limit``/``-remaining``/``-reset`` response headers.

- Local: the edge filter has no bucket of its own; each tenant's route carries its
  bucket (``requests_per_second``, burst of one second's worth). The bucket is shared by
  Envoy's worker threads, so it is a per-Envoy-process limit. A stream costs one token
  however many messages it carries.
- Global: each tenant's route sends the descriptor ``tenant=<name>`` to the rate-limit
  service, which counts in Redis; ``requests_per_minute`` is shared by all replicas.
  When the service cannot answer, ``failure_mode`` decides: open admits, closed refuses
  (UNAVAILABLE).
"""

from __future__ import annotations

from typing import Any

from gateway.core import duration, typed
from genmesh.core.deployment import Deployment, Tenant
from genmesh.core.failure import FailureMode

DOMAIN = "genmesh"  # the rate-limit service's domain for every edge descriptor
TENANT_KEY = "tenant"  # descriptor key
RLS_TIMEOUT_S = 0.5  # how long Envoy waits for the rate-limit service (its Redis timeout: 0.25 s)
LOCAL_FILTER = "envoy.filters.http.local_ratelimit"
GLOBAL_FILTER = "envoy.filters.http.ratelimit"


def local_filter() -> dict[str, Any]:
    """The edge's local rate-limit filter: inert until a route gives it a bucket."""
    return {"name": LOCAL_FILTER, "typed_config": typed(
        "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        stat_prefix="tenant_local")}


def local_bucket(tenant: Tenant) -> dict[str, Any]:
    """Per-route config of the local filter: the tenant's own token bucket."""
    always = {"numerator": 100, "denominator": "HUNDRED"}
    return typed(
        "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        stat_prefix=f"tenant_{tenant.name}",
        token_bucket={"max_tokens": tenant.requests_per_second,
                      "tokens_per_fill": tenant.requests_per_second,
                      "fill_interval": duration(1.0)},
        filter_enabled={"runtime_key": f"genmesh.local_ratelimit.{tenant.name}.enabled",
                        "default_value": always},
        filter_enforced={"runtime_key": f"genmesh.local_ratelimit.{tenant.name}.enforced",
                         "default_value": always},
        rate_limited_as_resource_exhausted=True,
        enable_x_ratelimit_headers="DRAFT_VERSION_03",
        response_headers_to_add=[_limited_by("local")])


def global_filter(cluster: str, failure_mode: FailureMode) -> dict[str, Any]:
    """The edge's global rate-limit filter, asking ``cluster`` (RLS v3 over gRPC)."""
    return {"name": GLOBAL_FILTER, "typed_config": typed(
        "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
        domain=DOMAIN,
        stage=0,
        timeout=duration(RLS_TIMEOUT_S),
        failure_mode_deny=failure_mode is FailureMode.CLOSED,
        rate_limited_as_resource_exhausted=True,
        enable_x_ratelimit_headers="DRAFT_VERSION_03",
        rate_limit_service={
            "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
            "transport_api_version": "V3",
        })}


def tenant_descriptors(tenant: Tenant) -> list[dict[str, Any]]:
    """The route's ``rate_limits``: one descriptor, ``tenant=<name>``."""
    return [{"stage": 0, "actions": [{"generic_key": {
        "descriptor_key": TENANT_KEY, "descriptor_value": tenant.name}}]}]


def service_limits(dep: Deployment) -> dict[str, Any]:
    """The rate-limit service's limits file (envoyproxy/ratelimit's format)."""
    return {"domain": DOMAIN, "descriptors": [
        {"key": TENANT_KEY, "value": t.name,
         "rate_limit": {"unit": "minute", "requests_per_unit": t.requests_per_minute}}
        for t in dep.tenants if t.requests_per_minute is not None]}


def _limited_by(which: str) -> dict[str, Any]:
    return {"header": {"key": "x-genmesh-rate-limited-by", "value": which},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
