"""What the routes and the rollout state changes make of the deployment description."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway import rollout
from gateway.envoy import build_bootstrap
from gateway.ratelimits import service_limits
from gateway.routes import edge_routes, mesh_routes
from genmesh.core import deployment
from genmesh.core.deployment import DeploymentError, Rollout, SplitMode

LOCAL = Path(__file__).parents[2] / "deploy" / "local.yaml"


def local() -> deployment.Deployment:
    return deployment.load(LOCAL, environ={})


def test_tenant_routes_stamp_the_tenant_drop_the_key_and_carry_the_limits():
    _, _, dev, anonymous, _ = edge_routes(local())
    [key_match] = dev["match"]["headers"]
    assert key_match == {"name": "x-api-key", "string_match": {
        "safe_regex": {"regex": "^(?:genmesh\\-dev\\-key)$"}}}
    assert dev["request_headers_to_add"][0]["header"] == {"key": "x-genmesh-tenant",
                                                          "value": "dev"}
    assert dev["request_headers_to_remove"] == ["x-api-key"]
    bucket = dev["typed_per_filter_config"]["envoy.filters.http.local_ratelimit"]
    assert bucket["token_bucket"]["max_tokens"] == 50
    assert bucket["rate_limited_as_resource_exhausted"] is True
    assert dev["route"]["rate_limits"][0]["actions"][0]["generic_key"] == {
        "descriptor_key": "tenant", "descriptor_value": "dev"}
    # A caller without a (known) key reaches the frontend with no tenant: UNAUTHENTICATED.
    assert anonymous["request_headers_to_remove"] == ["x-genmesh-tenant", "x-api-key"]
    assert service_limits(local())["descriptors"] == [{
        "key": "tenant", "value": "dev",
        "rate_limit": {"unit": "minute", "requests_per_unit": 1200}}]


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
