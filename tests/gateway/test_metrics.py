"""The metrics listener (gateway/metrics.py): its routes as rendered, then a real Envoy
that serves /stats/prometheus and /ready through it and nothing else of its admin."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml

from gateway import xds
from gateway.envoy import build_bootstrap, render, validate
from gateway.metrics import ADMIN_CLUSTER, admin_dial_host
from genmesh.core.deployment import (
    Deployment,
    GatewaySettings,
    ModelVersion,
    Rollout,
    Services,
    check,
)
from genmesh.security import pki
from tests.gateway.test_envoy import local_config, routes_of
from tests.gateway.test_envoy_e2e import running_envoy, wait_until
from tests.procs import free_port

NOT_SERVED = "genmesh metrics: only GET /stats/prometheus and GET /ready are served here"
# Admin endpoints that read secrets, change or stop Envoy, or list its internals.
ADMIN_ONLY = [("GET", "/config_dump"), ("POST", "/quitquitquit"), ("POST", "/healthcheck/fail"),
              ("POST", "/drain_listeners"), ("POST", "/logging?level=trace"), ("GET", "/stats"),
              ("GET", "/clusters"), ("GET", "/listeners"), ("GET", "/server_info"), ("GET", "/"),
              ("POST", "/runtime_modify?x=1"), ("POST", "/reset_counters")]
# Near misses of the served paths, and a served path with another method.
NEAR_MISSES = [("GET", "/stats/prometheus/../config_dump"), ("GET", "/STATS/PROMETHEUS"),
               ("GET", "/stats/prometheus/"), ("GET", "//stats/prometheus"),
               ("GET", "/stats/prometheus%2F..%2Fconfig_dump"), ("GET", "/readyz"),
               ("POST", "/stats/prometheus"), ("POST", "/ready")]


def metrics_listener_of(bootstrap: dict) -> dict:
    [listener] = [ln for ln in bootstrap["static_resources"]["listeners"]
                  if ln["name"] == "metrics"]
    return listener


def test_metrics_listener_routes_only_get_of_the_prometheus_and_ready_paths_to_admin():
    bootstrap = build_bootstrap(local_config(host="0.0.0.0", metrics_port=9902))
    assert bootstrap["admin"]["address"] == {
        "socket_address": {"address": "127.0.0.1", "port_value": 9901}}
    assert metrics_listener_of(bootstrap)["address"] == {
        "socket_address": {"address": "0.0.0.0", "port_value": 9902}}
    *served, rest = routes_of(bootstrap, "metrics")
    assert [r["match"] for r in served] == [
        {"path": path, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]}
        for path in ("/stats/prometheus", "/ready")]
    assert [r["route"] for r in served] == [{"cluster": ADMIN_CLUSTER}] * 2
    assert rest["match"] == {"prefix": "/"} and "route" not in rest
    assert rest["direct_response"]["status"] == 404
    [admin] = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == ADMIN_CLUSTER]
    [endpoint] = admin["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1", "port_value": 9901}
    # No other listener reaches admin.
    for listener in bootstrap["static_resources"]["listeners"]:
        if listener["name"] != "metrics":
            assert ADMIN_CLUSTER not in yaml.safe_dump(listener), listener["name"]


def test_without_a_metrics_port_there_is_no_metrics_listener_and_no_way_to_admin():
    bootstrap = build_bootstrap(local_config())
    names = [ln["name"] for ln in bootstrap["static_resources"]["listeners"]]
    assert names == ["edge", "mesh"]
    assert ADMIN_CLUSTER not in yaml.safe_dump(bootstrap)


def test_envoy_accepts_the_metrics_listener_in_both_renderings(tmp_path):
    secrets = str(pki.ensure(tmp_path / "secrets").directory)  # Envoy reads the files
    cfg = local_config(host="0.0.0.0", metrics_port=9902, secrets_dir=secrets)
    path = tmp_path / "envoy.yaml"
    path.write_text(render(cfg))
    validate(path)
    xds.apply(cfg, tmp_path / "xds")  # the live layout: validated by Envoy, then written
    listeners = yaml.safe_load((tmp_path / "xds" / "listeners.yaml").read_text())["resources"]
    [metrics] = [ln for ln in listeners if ln["name"] == "metrics"]
    assert "route_config" in metrics["filter_chains"][0]["filters"][0]["typed_config"]


def test_admin_is_dialled_on_loopback_when_it_listens_everywhere():
    assert [admin_dial_host(h) for h in ("0.0.0.0", "::", "127.0.0.1", "10.1.2.3")] == [
        "127.0.0.1", "::1", "127.0.0.1", "10.1.2.3"]


@pytest.mark.parametrize(("change", "problem"), [
    ({"metrics_port": 9901}, "ports must differ"),
    ({"metrics_port": 8080}, "ports must differ"),
    ({"admin_host": "localhost"}, "admin_host must be an IP address"),
])
def test_deployment_check_refuses_a_clashing_metrics_port_or_a_named_admin_host(change, problem):
    problems = check(local_config(**change))
    assert any(problem in p for p in problems), problems


# ---- a real Envoy --------------------------------------------------------------------------

def outside_address() -> str | None:
    """A non-loopback IPv4 address of this machine (no packet is sent), else None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("198.51.100.1", 9))  # TEST-NET-2; a UDP connect only picks a route
            address = str(probe.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@dataclass
class Served:
    cfg: Deployment
    host: str  # where the listeners are; admin is on 127.0.0.1


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    """Envoy with its listeners on a non-loopback address (as in a pod), admin on loopback.
    Its backends are ports with nothing behind them: Envoy serves its admin all the same."""
    host = outside_address() or "127.0.0.1"
    cfg = Deployment(
        model="m", versions=(ModelVersion("v1", (("127.0.0.1", free_port()),)),),
        rollout=Rollout(primary="v1"),
        services=Services(frontend=(("127.0.0.1", free_port()),),
                          tokenizer=(("127.0.0.1", free_port()),)),
        gateway=GatewaySettings(host=host, edge_port=free_port(), mesh_port=free_port(),
                                admin_port=free_port(), metrics_port=free_port(),
                                access_log=False))
    assert not check(cfg)
    with running_envoy(cfg, tmp_path_factory.mktemp("envoy")):
        url = f"http://{host}:{cfg.gateway.metrics_port}/ready"
        wait_until(lambda: urllib.request.urlopen(url, timeout=1).close(), timeout=15,
                   what="the metrics listener does not serve")
        yield Served(cfg, host)


def request(url: str, method: str = "GET") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method),
                                    timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_prometheus_scrapes_envoy_through_the_metrics_listener(served):
    metrics = f"http://{served.host}:{served.cfg.gateway.metrics_port}"
    status, body = request(f"{metrics}/stats/prometheus")
    assert status == 200
    assert "# TYPE envoy_server_live gauge" in body and "envoy_server_live{} 1" in body
    assert request(f"{metrics}/stats/prometheus?usedonly")[0] == 200
    assert request(f"{metrics}/ready") == (200, "LIVE\n")


@pytest.mark.parametrize(("method", "path"), ADMIN_ONLY + NEAR_MISSES)
def test_the_metrics_listener_answers_anything_else_itself_with_404(served, method, path):
    metrics = f"http://{served.host}:{served.cfg.gateway.metrics_port}"
    status, body = request(f"{metrics}{path}", method)
    assert (status, body[:len(NOT_SERVED)]) == (404, NOT_SERVED)  # not admin's own 404


def test_envoy_still_serves_after_quitquitquit_on_the_metrics_listener(served):
    metrics = f"http://{served.host}:{served.cfg.gateway.metrics_port}"
    assert request(f"{metrics}/quitquitquit", "POST")[0] == 404
    assert request(f"{metrics}/healthcheck/fail", "POST")[0] == 404
    assert request(f"http://127.0.0.1:{served.cfg.gateway.admin_port}/ready") == (200, "LIVE\n")
    assert request(f"{metrics}/ready") == (200, "LIVE\n")


def test_admin_is_not_reachable_on_the_listeners_address(served):
    if served.host.startswith("127."):
        pytest.skip("this machine has no non-loopback address to dial admin on")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((served.host, served.cfg.gateway.admin_port), timeout=2).close()
