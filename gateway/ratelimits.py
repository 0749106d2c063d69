"""Rate limits at the edge: Envoy's local token buckets per tenant, and the global limit
shared by every gateway replica through the rate-limit service (``services/ratelimit``).

How a gRPC client sees a limit: both filters answer with HTTP 429, which Envoy turns into
RESOURCE_EXHAUSTED (``rate_limited_as_resource_exhausted``; without it the client would
read UNAVAILABLE).

- Local: one bucket per tenant (``requests_per_second``, burst of one second's worth),
  shared by all of the tenant's routes (gRPC, and the HTTP API's Bearer and key header
  routes) and by Envoy's worker threads: a per-Envoy-process limit. A stream costs one
  token however many messages it carries. The bucket is a filter of its own in the edge's
  chain (``local_filters``), skipped by every request but those the key check
  (``gateway/authz.py``) stamped with the tenant's name: a matcher on the stamped header,
  evaluated when the request reaches the filter, after the check. (Switching it on by
  route cannot work with the check: Envoy picks a request's filters by its first route,
  before the check stamped the tenant.) A bucket in a route's ``typed_per_filter_config``
  would be one per route: a tenant with two routes would get twice its rate. One filter per
  tenant, rather than one filter with a descriptor per tenant, keeps the stats per tenant
  (``tenant_<name>.http_local_rate_limit.*``, which the dashboards read), the runtime
  switches per tenant, and leaves the routes' ``rate_limits`` to the global filter alone.
  The buckets live in the listener: changing a tenant's rate rewrites the edge listener
  (its connections drain), not just its routes; tenants change only at ``genmesh up``.
- Global: each tenant's route sends the descriptor ``tenant=<name>`` to the rate-limit
  service, which counts in Redis; ``requests_per_minute`` is shared by all replicas.
  When the service cannot answer, ``failure_mode`` decides: open admits, closed refuses
  (UNAVAILABLE).

What a refusal says: the limit that refused and when it has room again, in its message
(gRPC's ``grpc-message``; the HTTP API's error message, ``gateway/listeners.py``) and in
headers that describe that limit alone: ``x-ratelimit-limit`` (requests per the limit's
window), ``x-ratelimit-remaining`` (0), ``x-ratelimit-reset`` and ``retry-after`` (whole
seconds until it has room), and ``x-genmesh-rate-limited-by`` (``local`` or ``global``).

- A local refusal's headers are the tenant filter's own, the same on every refusal (its
  rate; the bucket is full again within its one-second fill interval), with the tenant's
  name in ``x-genmesh-tenant``: the edge's local reply mappers build the message from
  them (``LOCAL_REFUSAL_MESSAGE``), one mapper for every tenant.
- A global refusal's headers and message (its body) come from the rate-limit service
  (``services/ratelimit/refusal.py``), which knows the limit and its window's end.
- No other response carries ``x-ratelimit-*``. Envoy's own (``enable_x_ratelimit_headers``)
  stay off in both filters: each appends them to every response that passed it, so a
  global refusal carried the local bucket's ``remaining: 4``/``reset: 0`` beside the
  global limit's, and a token budget refusal (the frontend's RESOURCE_EXHAUSTED passes
  both filters) the global limit's ``remaining: 29``/``reset: 34`` beside its own
  ``retry-after: 12``: headers of a limit that did not refuse, telling the client it may
  retry sooner than it can.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.core import duration, typed
from genmesh.core import metadata
from genmesh.core.deployment import Deployment, Tenant
from genmesh.core.failure import FailureMode

DOMAIN = "genmesh"  # the rate-limit service's domain for every edge descriptor
TENANT_KEY = "tenant"  # descriptor key
RLS_TIMEOUT_S = 0.5  # how long Envoy waits for the rate-limit service (its Redis timeout: 0.25 s)
LOCAL_FILTER_PREFIX = "genmesh.local_ratelimit"  # + ".<tenant>": the tenant's local filter
GLOBAL_FILTER = "envoy.filters.http.ratelimit"
# A local bucket's fill interval, and so the whole seconds a refused client waits for room.
LOCAL_FILL_INTERVAL_S = 1
LIMITED_BY = "x-genmesh-rate-limited-by"  # on a refusal: "local" or "global"
# The message of a local refusal, from the headers the tenant's filter adds to it.
LOCAL_REFUSAL_MESSAGE = (
    f"tenant '%RESP({metadata.TENANT})%' is over its requests_per_second limit of "
    "%RESP(x-ratelimit-limit)% at this gateway; retry in %RESP(x-ratelimit-reset)% s")


def local_filters(tenants: Sequence[Tenant]) -> list[dict[str, Any]]:
    """The edge's local rate-limit filters: one per tenant, holding its bucket, skipped by
    every request not stamped as the tenant's (``only_for``)."""
    return [{"name": local_filter_name(t), "typed_config": only_for(t, local_bucket(t))}
            for t in tenants]


def only_for(tenant: Tenant, config: dict[str, Any]) -> dict[str, Any]:
    """The filter ``config``, skipped by a request whose tenant header (stamped by the key
    check, which removes any a client sent) is not the tenant's name, or is absent."""
    is_tenant = {"single_predicate": {
        "input": {"name": "tenant", "typed_config": typed(
            "envoy.type.matcher.v3.HttpRequestHeaderMatchInput", header_name=metadata.TENANT)},
        "value_match": {"exact": tenant.name}}}
    skip = {"action": {"name": "skip", "typed_config": typed(
        "envoy.extensions.filters.common.matcher.action.v3.SkipFilter")}}
    return typed(
        "envoy.extensions.common.matching.v3.ExtensionWithMatcher",
        extension_config={"name": local_filter_name(tenant), "typed_config": config},
        xds_matcher={"matcher_list": {"matchers": [
            {"predicate": {"not_matcher": is_tenant}, "on_match": skip}]}})


def local_filter_name(tenant: Tenant) -> str:
    return f"{LOCAL_FILTER_PREFIX}.{tenant.name}"


def local_bucket(tenant: Tenant) -> dict[str, Any]:
    """The config of the tenant's local filter: its token bucket, enforced on every request
    that reaches the filter (runtime keys ``genmesh.local_ratelimit.<name>.enabled`` and
    ``.enforced`` can lower that), and the headers of its refusals."""
    always = {"numerator": 100, "denominator": "HUNDRED"}
    return typed(
        "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        stat_prefix=f"tenant_{tenant.name}",
        token_bucket={"max_tokens": tenant.requests_per_second,
                      "tokens_per_fill": tenant.requests_per_second,
                      "fill_interval": duration(LOCAL_FILL_INTERVAL_S)},
        filter_enabled={"runtime_key": f"{local_filter_name(tenant)}.enabled",
                        "default_value": always},
        filter_enforced={"runtime_key": f"{local_filter_name(tenant)}.enforced",
                         "default_value": always},
        rate_limited_as_resource_exhausted=True,
        response_headers_to_add=local_refusal_headers(tenant))


def local_refusal_headers(tenant: Tenant) -> list[dict[str, Any]]:
    """The headers of every refusal by the tenant's bucket. They can be fixed: a refused
    request found the bucket empty, and it is full again within one fill interval."""
    wait_s = str(LOCAL_FILL_INTERVAL_S)
    return [_header(name, value) for name, value in (
        ("x-ratelimit-limit", str(tenant.requests_per_second)),
        ("x-ratelimit-remaining", "0"),
        ("x-ratelimit-reset", wait_s),
        (metadata.RETRY_AFTER, wait_s),
        (LIMITED_BY, "local"),
        (metadata.TENANT, tenant.name))]


def global_filter(cluster: str, failure_mode: FailureMode) -> dict[str, Any]:
    """The edge's global rate-limit filter, asking ``cluster`` (RLS v3 over gRPC). Its
    ``response_headers_to_add`` go on its refusals only, beside the service's."""
    return {"name": GLOBAL_FILTER, "typed_config": typed(
        "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
        domain=DOMAIN,
        stage=0,
        timeout=duration(RLS_TIMEOUT_S),
        failure_mode_deny=failure_mode is FailureMode.CLOSED,
        rate_limited_as_resource_exhausted=True,
        response_headers_to_add=[_header(LIMITED_BY, "global")],
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


def _header(name: str, value: str) -> dict[str, Any]:
    return {"header": {"key": name, "value": value},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
