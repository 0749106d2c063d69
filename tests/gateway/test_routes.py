"""What the routes and the rollout state changes make of the deployment description."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from gateway import rollout
from gateway.envoy import build_bootstrap
from gateway.ratelimits import service_limits
from gateway.routes import edge_routes, mesh_routes
from genmesh.core import deployment
from genmesh.core.deployment import DeploymentError, Rollout, SplitMode, Tenant

LOCAL = Path(__file__).parents[2] / "deploy" / "local.yaml"


def local() -> deployment.Deployment:
    dep = deployment.load(LOCAL, environ={})
    return dataclasses.replace(dep, security=dataclasses.replace(
        dep.security, secrets_dir="/etc/genmesh/secrets"))


def test_tenant_routes_match_the_checked_tenant_drop_the_keys_and_carry_the_limits():
    health, reflection, dev, anonymous, *_ = edge_routes(local())
    # The key check (ext_authz) stamped the tenant; no key is matched, or written, here.
    assert dev["match"]["headers"] == [{"name": "x-genmesh-tenant",
                                        "string_match": {"exact": "dev"}}]
    assert "request_headers_to_add" not in dev
    assert dev["request_headers_to_remove"] == ["x-api-key", "authorization"]
    assert "typed_per_filter_config" not in dev  # the bucket follows the stamped tenant
    assert dev["route"]["rate_limits"][0]["actions"][0]["generic_key"] == {
        "descriptor_key": "tenant", "descriptor_value": "dev"}
    # A caller without a (known) key reaches the frontend with no tenant: UNAUTHENTICATED.
    assert anonymous["request_headers_to_remove"] == ["x-genmesh-tenant", "x-api-key"]
    # Health and reflection need no key (but are checked: a tenant header is removed).
    assert "headers" not in health["match"] and "headers" not in reflection["match"]
    assert service_limits(local())["descriptors"] == [{
        "key": "tenant", "value": "dev",
        "rate_limit": {"unit": "minute", "requests_per_unit": 1200}}]


def test_http_api_routes_authenticate_like_the_grpc_routes():
    dep = local()
    _, _, grpc_dev, _, http_dev, anonymous, unrouted = edge_routes(dep)
    assert http_dev == {
        "match": {"prefix": "/v1/", "headers": [{"name": "x-genmesh-tenant",
                                                 "string_match": {"exact": "dev"}}]},
        "route": {"cluster": "httpapi", "timeout": "0s", "rate_limits": [{
            "stage": 0, "actions": [{"generic_key": {"descriptor_key": "tenant",
                                                     "descriptor_value": "dev"}}]}]},
        "request_headers_to_remove": ["authorization", "x-api-key"],
    }
    # The same global limit as the tenant's gRPC route (and the same local bucket).
    assert http_dev["route"]["rate_limits"] == grpc_dev["route"]["rate_limits"]
    # Anyone else reaches the HTTP API with no tenant and no credential: it answers 401.
    assert anonymous == {"match": {"prefix": "/v1/"},
                         "route": {"cluster": "httpapi", "timeout": "0s"},
                         "request_headers_to_remove": ["x-genmesh-tenant", "authorization",
                                                       "x-api-key"]}
    assert unrouted["direct_response"]["body"]["inline_string"] == (
        "genmesh edge: no route for this path; served here: genmesh.v1.Generation, "
        "grpc.health.v1.Health, grpc.reflection, the OpenAI-compatible HTTP API (/v1/)")


def test_no_key_is_in_the_config_and_the_key_check_runs_before_the_limits():
    tenants = (Tenant("a", ("key-of-a.1", "key-of-a+2"), requests_per_second=5),
               Tenant("b", ("key-of-b|3",), requests_per_second=7, requests_per_minute=60))
    dep = dataclasses.replace(local(), tenants=tenants)
    text = yaml.safe_dump(build_bootstrap(dep))
    assert "key-of-" not in text
    [edge, _] = build_bootstrap(dep)["static_resources"]["listeners"]
    filters = edge["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    names = [f["name"] for f in filters]
    assert names[:2] == ["envoy.filters.http.body_size_limit", "envoy.filters.http.ext_authz"]
    check = filters[1]["typed_config"]
    assert check["grpc_service"]["envoy_grpc"] == {"cluster_name": "frontend"}
    assert (check["failure_mode_allow"], check["clear_route_cache"]) == (False, True)
    assert check["allowed_headers"] == {"patterns": [{"exact": "x-api-key"},
                                                     {"exact": "authorization"}]}
    v1 = [r for r in edge_routes(dep) if r["match"]["prefix"] == "/v1/"]
    assert [r["match"].get("headers") for r in v1] == [
        [{"name": "x-genmesh-tenant", "string_match": {"exact": "a"}}],
        [{"name": "x-genmesh-tenant", "string_match": {"exact": "b"}}], None]
    # Without tenants nothing is checked: there is no key to check.
    bare = dataclasses.replace(local(), tenants=())
    [edge, _] = build_bootstrap(bare)["static_resources"]["listeners"]
    assert "envoy.filters.http.ext_authz" not in str(edge)


def test_each_tenant_has_one_local_bucket_which_only_its_stamped_requests_reach():
    tenants = (Tenant("a", ("ka",), requests_per_second=5),
               Tenant("b", ("kb",), requests_per_second=7, requests_per_minute=60))
    dep = dataclasses.replace(local(), tenants=tenants)
    [edge, _] = build_bootstrap(dep)["static_resources"]["listeners"]
    filters = edge["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    local_filters = {f["name"]: f for f in filters if "local_ratelimit" in f["name"]}
    assert list(local_filters) == ["genmesh.local_ratelimit.a", "genmesh.local_ratelimit.b"]
    a = local_filters["genmesh.local_ratelimit.a"]["typed_config"]
    # Skipped by every request the key check did not stamp as a's (no tenant, another).
    assert a["@type"] == ("type.googleapis.com/envoy.extensions.common.matching.v3."
                          "ExtensionWithMatcher")
    [skip_unless_a] = a["xds_matcher"]["matcher_list"]["matchers"]
    assert skip_unless_a["predicate"]["not_matcher"]["single_predicate"] == {
        "input": {"name": "tenant", "typed_config": {
            "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
            "header_name": "x-genmesh-tenant"}},
        "value_match": {"exact": "a"}}
    assert skip_unless_a["on_match"]["action"]["typed_config"]["@type"] == (
        "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter")
    assert a["extension_config"]["name"] == "genmesh.local_ratelimit.a"
    assert a["extension_config"]["typed_config"] == {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3."
                 "LocalRateLimit",
        "stat_prefix": "tenant_a",
        "token_bucket": {"max_tokens": 5, "tokens_per_fill": 5, "fill_interval": "1s"},
        "filter_enabled": {"runtime_key": "genmesh.local_ratelimit.a.enabled",
                           "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        "filter_enforced": {"runtime_key": "genmesh.local_ratelimit.a.enforced",
                            "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        "rate_limited_as_resource_exhausted": True,
        # On its refusals only: the bucket's limit, empty, full again within its fill
        # interval. Envoy's own x-ratelimit-* would go on every response (a global
        # refusal's too) and are off.
        "response_headers_to_add": [
            {"header": {"key": key, "value": value},
             "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for key, value in [("x-ratelimit-limit", "5"), ("x-ratelimit-remaining", "0"),
                               ("x-ratelimit-reset", "1"), ("retry-after", "1"),
                               ("x-genmesh-rate-limited-by", "local"),
                               ("x-genmesh-tenant", "a")]]}
    b = local_filters["genmesh.local_ratelimit.b"]["typed_config"]["extension_config"]
    assert b["typed_config"]["token_bucket"]["max_tokens"] == 7
    # No route switches a bucket on or off: a request reaches its tenant's alone.
    assert not any("typed_per_filter_config" in r for r in edge_routes(dep))


def test_without_the_http_api_the_edge_has_no_v1_routes():
    dep = local()
    dep = dataclasses.replace(dep, services=dataclasses.replace(dep.services, httpapi=()))
    routes = edge_routes(dep)
    assert [r["match"]["prefix"] for r in routes] == [
        "/grpc.health.v1.Health/", "/grpc.reflection.", "/genmesh.v1.Generation/",
        "/genmesh.v1.Generation/", "/"]
    assert "HTTP API" not in routes[-1]["direct_response"]["body"]["inline_string"]


def worker_route(dep: deployment.Deployment) -> dict:
    """The split route: Generate without a pinned or routed version."""
    return next(r for r in mesh_routes(dep)
                if r["match"]["prefix"] == "/genmesh.v1.Worker/Generate"
                and "headers" not in r["match"])


def test_routed_generate_goes_to_its_version_and_keeps_the_mirror():
    dep = local().with_rollout(Rollout(primary="v1", candidate="v2", canary_percent=50,
                                       shadow_percent=20))
    routed = {r["match"]["headers"][0]["string_match"]["exact"]: r["route"]
              for r in mesh_routes(dep) if r["match"]["prefix"] == "/genmesh.v1.Worker/Generate"
              and r["match"].get("headers", [{}])[0].get("name") == "x-genmesh-routed-version"}
    assert {v: r["cluster"] for v, r in routed.items()} == {"v1": "worker-v1", "v2": "worker-v2"}
    assert all(r["request_mirror_policies"][0]["cluster"] == "worker-v2"
               for r in routed.values())


def test_worker_routes_split_mirror_and_hash_by_the_rollout():
    dep = local().with_rollout(Rollout(primary="v1", candidate="v2", canary_percent=12.5,
                                       shadow_percent=20, split=SplitMode.TENANT))
    route = worker_route(dep)["route"]
    assert route["weighted_clusters"] == {
        "clusters": [{"name": "worker-v1", "weight": 8750}, {"name": "worker-v2", "weight": 1250}],
        "header_name": "x-genmesh-ab-bucket"}
    [mirror] = route["request_mirror_policies"]
    assert mirror["cluster"] == "worker-v2"
    assert mirror["runtime_fraction"]["default_value"] == {"numerator": 2000,
                                                          "denominator": "TEN_THOUSAND"}
    assert route["hash_policy"] == [{"header": {"header_name": "x-genmesh-prefix-key"}}]
    pinned = [r for r in mesh_routes(dep)
              if r["match"].get("headers", [{}])[0].get("name") == "x-genmesh-model-version"]
    assert [(r["match"]["headers"][0]["string_match"]["exact"], r["route"]["cluster"])
            for r in pinned] == [("v1", "worker-v1"), ("v2", "worker-v2")]
    clusters = {c["name"]: c for c in build_bootstrap(dep)["static_resources"]["clusters"]}
    assert clusters["worker-v1"]["lb_policy"] == "RING_HASH"
    assert all(c["outlier_detection"]["consecutive_gateway_failure"] == 5
               for c in clusters.values())
    # Only idempotent tokenizer calls are retried.
    retried = [r["match"]["prefix"] for r in mesh_routes(dep)
               if "retry_policy" in r.get("route", {})]
    assert retried == ["/genmesh.v1.Tokenizer/Tokenize", "/genmesh.v1.Tokenizer/ApplyChatTemplate",
                       "/genmesh.v1.Tokenizer/DescribeModel"]


def test_without_a_candidate_the_primary_takes_everything():
    dep = local().with_rollout(Rollout(primary="v2"))
    route = worker_route(dep)["route"]
    assert route["cluster"] == "worker-v2"
    assert "request_mirror_policies" not in route


def test_rollout_transitions():
    r = Rollout(primary="v1", candidate="v2")
    r = rollout.shadow(rollout.canary(r, 10), 50)
    assert (r.canary_percent, r.shadow_percent) == (10.0, 50.0)
    assert rollout.rollback(r) == Rollout(primary="v1", candidate="v2")
    promoted = rollout.promote(r)
    assert promoted == Rollout(primary="v2", candidate="v1", previous_primary="v1")
    assert rollout.rollback(promoted) == Rollout(primary="v1", candidate="v2")
    with pytest.raises(DeploymentError, match="no candidate"):
        rollout.canary(Rollout(primary="v1"), 5)
    assert "canary 10%" in rollout.describe(rollout.canary(Rollout("v1", "v2"), 10))
    assert dataclasses.replace(r, split=SplitMode.TENANT).split is SplitMode.TENANT
