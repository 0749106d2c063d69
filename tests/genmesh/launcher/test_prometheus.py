"""Prometheus for the local mesh: the scrape configuration, the static file that must equal
it, the server's command line, and promtool's verdict where Prometheus is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from genmesh.launcher.prometheus import (
    DEFAULT_ENVOY_ADMIN,
    DEFAULT_TARGETS,
    duration,
    prometheus_argv,
    prometheus_binary,
    render,
    scrape_config,
)
from tests.procs import REPO_ROOT

STATIC_FILE = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"


def _jobs(config: dict) -> dict[str, dict]:
    return {job["job_name"]: job for job in config["scrape_configs"]}


def test_one_job_per_process_then_envoy():
    config = scrape_config({"frontend": ["127.0.0.1:9101", "127.0.0.1:9201"],
                            "worker-v1": ["127.0.0.1:9161"], "worker-v2": ["127.0.0.1:9162"]},
                           envoy_admin="127.0.0.1:9901", scrape_interval_s=2)
    assert config["global"] == {"scrape_interval": "2s", "evaluation_interval": "2s"}
    assert list(_jobs(config)) == ["frontend", "worker-v1", "worker-v2", "envoy"]
    assert config["scrape_configs"][0] == {
        "job_name": "frontend",
        "metrics_path": "/metrics",
        "static_configs": [{"targets": ["127.0.0.1:9101", "127.0.0.1:9201"],
                            "labels": {"service": "frontend"}}],
    }
    assert config["scrape_configs"][-1] == {
        "job_name": "envoy",
        "metrics_path": "/stats/prometheus",
        "static_configs": [{"targets": ["127.0.0.1:9901"], "labels": {"service": "envoy"}}],
    }


def test_the_versions_of_a_service_share_its_service_label():
    jobs = _jobs(scrape_config(DEFAULT_TARGETS, envoy_admin=None))
    services = {name: job["static_configs"][0]["labels"]["service"] for name, job in jobs.items()}
    assert services == {"frontend": "frontend", "tokenizer": "tokenizer", "safety": "safety",
                        "cache": "cache", "worker-v1": "worker", "worker-v2": "worker",
                        "ratelimit": "ratelimit"}


def test_without_envoy_or_endpoints_there_is_no_job():
    config = scrape_config({"frontend": ["127.0.0.1:9101"], "safety": []}, envoy_admin=None)
    assert list(_jobs(config)) == ["frontend"]


def test_a_process_named_envoy_is_refused_beside_envoy():
    with pytest.raises(ValueError, match="envoy"):
        scrape_config({"envoy": ["127.0.0.1:1"]}, envoy_admin="127.0.0.1:9901")


@pytest.mark.parametrize(("seconds", "text"), [(5, "5s"), (5.0, "5s"), (0.25, "250ms"),
                                               (1.5, "1500ms"), (60, "60s")])
def test_durations(seconds, text):
    assert duration(seconds) == text


def test_a_duration_under_a_millisecond_is_refused():
    with pytest.raises(ValueError, match="1 ms"):
        scrape_config(DEFAULT_TARGETS, envoy_admin=None, scrape_interval_s=0.0001)


def test_the_static_file_is_what_the_defaults_render():
    rendered = render(scrape_config(DEFAULT_TARGETS, envoy_admin=DEFAULT_ENVOY_ADMIN))
    text = STATIC_FILE.read_text()
    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    assert body == rendered, (
        f"{STATIC_FILE} differs from scrape_config's rendering of the defaults; render it "
        "anew (the command is in the file's header) rather than editing it by hand")
    assert yaml.safe_load(text) == yaml.safe_load(rendered)


def test_the_static_file_scrapes_the_default_ports():
    targets = {name: job["static_configs"][0]["targets"]
               for name, job in _jobs(yaml.safe_load(STATIC_FILE.read_text())).items()}
    assert targets == {
        "frontend": ["127.0.0.1:9101"], "tokenizer": ["127.0.0.1:9102"],
        "safety": ["127.0.0.1:9103"], "cache": ["127.0.0.1:9104"],
        "worker-v1": ["127.0.0.1:9161"], "worker-v2": ["127.0.0.1:9162"],
        "ratelimit": ["127.0.0.1:9171"], "envoy": ["127.0.0.1:9901"]}


def test_argv():
    argv = prometheus_argv(Path("/usr/bin/prometheus"), Path("/run/p/prometheus.yml"),
                           host="127.0.0.1", port=9090, data_dir=Path("/run/p/data"))
    assert argv == ("/usr/bin/prometheus", "--config.file=/run/p/prometheus.yml",
                    "--web.listen-address=127.0.0.1:9090", "--storage.tsdb.path=/run/p/data",
                    "--storage.tsdb.retention.time=6h")
    shorter = prometheus_argv(Path("prometheus"), Path("p.yml"), host="::1", port=1,
                              data_dir=Path("d"), retention="30m")
    assert shorter[-1] == "--storage.tsdb.retention.time=30m"


def test_binary_is_the_one_on_path(monkeypatch, tmp_path):
    fake = tmp_path / "prometheus"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert prometheus_binary() == fake
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert prometheus_binary() is None


def test_promtool_accepts_the_rendered_config(tmp_path):
    binary = prometheus_binary()
    if binary is None:
        pytest.skip("no prometheus on PATH (`apt install prometheus` brings it and promtool)")
    promtool = binary.with_name("promtool")
    if not promtool.exists():
        found = shutil.which("promtool")
        if found is None:
            pytest.skip(f"prometheus at {binary} but no promtool beside it or on PATH")
        promtool = Path(found)
    config = tmp_path / "prometheus.yml"
    config.write_text(render(scrape_config(DEFAULT_TARGETS, envoy_admin=DEFAULT_ENVOY_ADMIN)))
    for path in (config, STATIC_FILE):
        result = subprocess.run([str(promtool), "check", "config", str(path)],
                                capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
