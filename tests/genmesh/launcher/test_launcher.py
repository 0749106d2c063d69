"""The launcher: `genmesh up` and `genmesh status` as a user runs them, the supervisor's
failure reporting, and what a missing piece tells the user."""

from __future__ import annotations

import json
import sys

import pytest

from genmesh.cli import main as genmesh
from genmesh.launcher import plan as plan_module
from genmesh.launcher.plan import MeshConfig, MissingPieceError, ProcessSpec, plan
from genmesh.launcher.ports import free_ports
from genmesh.launcher.probes import GrpcHealth
from genmesh.launcher.prometheus import prometheus_binary
from genmesh.launcher.supervisor import STATE_FILE, ProcessFailedError, Supervisor

HAS_PROMETHEUS = prometheus_binary() is not None


def test_status_of_the_running_mesh_is_all_serving(mesh, capsys):
    assert genmesh(["status", "--run-dir", str(mesh.config.run_dir)]) == 0
    table = capsys.readouterr().out
    for name in ("redis", "ratelimit", "tokenizer", "safety", "cache", "worker-v1", "frontend",
                 "httpapi", "envoy"):
        assert f"{name} " in table
    num_processes = 9 + HAS_PROMETHEUS  # Prometheus joins when it is installed
    assert table.count("NOT SERVING") == 0 and table.count("SERVING") == num_processes


def test_status_without_a_mesh_says_how_to_start_one(tmp_path, capsys):
    assert genmesh(["status", "--run-dir", str(tmp_path)]) == 1
    assert "genmesh up" in capsys.readouterr().err


def test_status_exits_non_zero_when_a_process_is_down(tmp_path, capsys):
    [port] = free_ports(1)
    state = {"processes": [{"name": "worker", "pid": 1, "endpoint": f"127.0.0.1:{port}",
                            "probe": "GrpcHealth", "probe_args": [f"127.0.0.1:{port}"]}]}
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    assert genmesh(["status", "--run-dir", str(tmp_path)]) == 1
    assert "NOT SERVING" in capsys.readouterr().out


def test_missing_model_names_the_fix(tmp_path, capsys):
    assert genmesh(["up", "--model", "no-such-model", "--run-dir", str(tmp_path)]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_missing_redis_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_module, "redis_binary", lambda: None)
    with pytest.raises(MissingPieceError, match="make setup"):
        plan(MeshConfig(run_dir=tmp_path))


def test_redis_versions_parse_from_what_redis_server_says():
    parse = plan_module.parse_redis_version
    assert parse("Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 "
                 "build=c4acb1ba84ed1ec6\n") == (7, 0, 15)
    assert parse("Redis server v=6.2.14 sha=40305114:0 malloc=libc bits=64 "
                 "build=dff95a8e7a99d269") == (6, 2, 14)
    assert parse("Redis server v=6.0.16 sha=00000000:0 malloc=jemalloc-5.2.1") == (6, 0, 16)
    assert parse("Valkey server v=8.0.1 sha=00000000:0 malloc=jemalloc-5.3.0") == (8, 0, 1)
    assert parse("redis-server: not found") is None and parse("") is None
    assert (6, 0, 16) < plan_module.MIN_ACL_REDIS_VERSION <= (6, 2, 0) < (6, 10, 0)
    redis = plan_module.redis_binary()  # the one `make setup` installs reads the ACL file
    if redis is not None:
        assert plan_module.redis_version(redis) >= plan_module.MIN_ACL_REDIS_VERSION


def test_a_redis_too_old_for_the_acl_file_names_both_versions(tmp_path, monkeypatch):
    """`resetchannels` in the mesh's ACL file needs Redis 6.2: with mTLS an older one (or
    one that does not say) fails before anything starts; without, it will do."""
    old = tmp_path / "redis-server"
    old.write_text("#!/bin/sh\necho 'Redis server v=6.0.16 sha=00000000:0 "
                   "malloc=jemalloc-5.2.1 bits=64 build=a3fdef44459b3ad6'\n")
    old.chmod(0o755)
    monkeypatch.setattr(plan_module, "redis_binary", lambda: old)
    with pytest.raises(MissingPieceError, match=r"is v6\.0\.16; .* need redis-server >= 6\.2"):
        plan(MeshConfig(run_dir=tmp_path / "mtls", mtls=True, with_prometheus=False))
    specs = plan(MeshConfig(run_dir=tmp_path / "plain", mtls=False, with_prometheus=False))
    assert specs[0].name == "redis" and specs[0].argv[0] == str(old)
    old.write_text("#!/bin/sh\nexit 1\n")
    with pytest.raises(MissingPieceError, match="of unknown version"):
        plan(MeshConfig(run_dir=tmp_path / "mtls", mtls=True, with_prometheus=False))


def test_plan_renders_a_valid_envoy_config_and_orders_the_processes(tmp_path):
    specs = plan(MeshConfig(run_dir=tmp_path, with_prometheus=False))
    assert [s.name for s in specs] == ["redis", "ratelimit", "tokenizer", "safety", "cache",
                                       "worker-v1", "worker-v2", "frontend", "httpapi",
                                       "envoy"]
    assert (tmp_path / "envoy.yaml").exists()
    assert sorted(p.name for p in (tmp_path / "xds").iterdir()) == [
        "clusters.yaml", "listeners.yaml", "routes-edge.yaml", "routes-mesh.yaml"]
    assert (tmp_path / "deployment.yaml").stat().st_mode & 0o077 == 0  # it holds API keys
    frontend = next(s for s in specs if s.name == "frontend")
    assert "127.0.0.1:8081" in frontend.argv  # the frontend calls through Envoy's mesh
    workers = {s.name: s.argv for s in specs if s.name.startswith("worker")}
    assert "bfloat16" in workers["worker-v1"] and "float32" in workers["worker-v2"]


def test_plan_sets_the_stop_order_the_stream_grace_and_the_edge_drain(tmp_path):
    specs = plan(MeshConfig(run_dir=tmp_path, with_prometheus=False, stream_grace_s=30.0,
                            admin_port=9911))
    stages = {s.name: s.stop_stage.name for s in specs}
    assert stages == {"redis": "STORE", "ratelimit": "SERVICE", "tokenizer": "SERVICE",
                      "safety": "SERVICE", "cache": "SERVICE", "worker-v1": "WORKER",
                      "worker-v2": "WORKER", "frontend": "FRONTEND", "httpapi": "FRONTEND",
                      "envoy": "GATEWAY"}
    by_name = {s.name: s for s in specs}
    for name in ("frontend", "httpapi", "worker-v1"):
        argv = list(by_name[name].argv)
        assert argv[argv.index("--shutdown-grace-s") + 1] == "30.0"
        assert by_name[name].stop_timeout_s == 35.0  # the grace, then 5 s to wind up
    assert "--shutdown-grace-s" not in by_name["tokenizer"].argv  # its own 5 s
    assert [s.drain_url for s in specs if s.drain_url] == [
        "http://127.0.0.1:9911/drain_listeners?inboundonly"]


def test_plan_without_redis_keeps_local_limits_only(tmp_path):
    specs = plan(MeshConfig(run_dir=tmp_path, with_redis=False, versions=("v1",),
                            with_prometheus=False))
    assert [s.name for s in specs] == ["tokenizer", "safety", "cache", "worker-v1", "frontend",
                                       "httpapi", "envoy"]
    safety = next(s for s in specs if s.name == "safety")
    assert "--audit-file" in safety.argv  # no Redis: audit records go to a JSONL file
    cache = next(s for s in specs if s.name == "cache")
    assert "--redis-url" not in cache.argv  # no Redis: the cache keeps answers in memory
    routes = (tmp_path / "xds" / "routes-edge.yaml").read_text()
    listeners = (tmp_path / "xds" / "listeners.yaml").read_text()
    assert "tenant_dev" in listeners and "rate_limits" not in routes


def test_a_process_that_dies_while_starting_is_reported_with_its_log(tmp_path):
    [port] = free_ports(1)
    crash = ProcessSpec("crashy", (sys.executable, "-c", "print('bad flag --x'); exit(3)"),
                        f"127.0.0.1:{port}", GrpcHealth(f"127.0.0.1:{port}"))
    supervisor = Supervisor([crash], run_dir=tmp_path)
    supervisor.start()
    try:
        with pytest.raises(ProcessFailedError, match=r"(?s)crashy exited with status 3.*bad flag"):
            supervisor.wait_ready(timeout_s=10)
    finally:
        supervisor.stop()
    assert not (tmp_path / STATE_FILE).exists()


def test_every_service_serves_metrics_and_prometheus_scrapes_them(tmp_path):
    specs = plan(MeshConfig(run_dir=tmp_path, with_prometheus=HAS_PROMETHEUS,
                            otlp_endpoint="127.0.0.1:4317"))
    for spec in specs:
        if spec.name not in ("redis", "envoy", "prometheus"):
            assert "--metrics-port" in spec.argv, spec.name
            assert spec.argv[spec.argv.index("--otlp-endpoint") + 1] == "127.0.0.1:4317"
    envoy = (tmp_path / "xds" / "listeners.yaml").read_text()
    assert "envoy.tracers.opentelemetry" in envoy
    if HAS_PROMETHEUS:
        assert specs[-1].name == "prometheus"
        config = (tmp_path / "prometheus.yml").read_text()
        assert "127.0.0.1:9161" in config and "/stats/prometheus" in config


def test_prometheus_wanted_but_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr("genmesh.launcher.prometheus.prometheus_binary", lambda: None)
    with pytest.raises(MissingPieceError, match="apt install prometheus"):
        plan(MeshConfig(run_dir=tmp_path, with_prometheus=True))
