"""`genmesh gateway`: render, limits and run, from the compose and Kubernetes deployments."""

from __future__ import annotations

import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from gateway import ratelimits
from gateway.envoy import envoy_command, render, validate
from genmesh import cli
from genmesh.commands import gateway as gateway_command
from genmesh.core import deployment as deploy
from genmesh.security import pki
from tests.procs import REPO_ROOT

# Envoy's validation reads the certificate files a deployment names (a container mounts
# them at its security.secrets_dir): the descriptions as they are, reading real files.
_SECRETS = pki.ensure(Path(tempfile.mkdtemp(prefix="genmesh-test-secrets-")) / "secrets")


def _with_secrets(path: Path) -> Path:
    raw = yaml.safe_load(path.read_text())
    raw["security"]["secrets_dir"] = str(_SECRETS.directory)
    copy = _SECRETS.directory.parent / path.name
    copy.write_text(yaml.safe_dump(raw))
    return copy


COMPOSE_DEPLOYMENT = _with_secrets(REPO_ROOT / "deploy" / "compose" / "deployment.yaml")
K8S_DEPLOYMENT = _with_secrets(REPO_ROOT / "deploy" / "k8s" / "base" / "mesh-deployment.yaml")
KEY = "testdevkey0123456789"


@pytest.fixture
def dev_key(monkeypatch):
    monkeypatch.setenv("GENMESH_DEV_API_KEY", KEY)


@pytest.mark.parametrize("path", [COMPOSE_DEPLOYMENT, K8S_DEPLOYMENT], ids=["compose", "k8s"])
def test_render_prints_the_validated_static_bootstrap(path, dev_key, capsys):
    assert cli.main(["gateway", "render", "--deployment", str(path)]) == 0
    out = capsys.readouterr().out
    assert out == render(deploy.load(path))
    # Keys are checked by the frontend's Authorization service, never held by Envoy.
    assert KEY not in out and "ext_authz" in out


def test_render_refuses_a_deployment_whose_key_is_unset(monkeypatch, capsys):
    monkeypatch.delenv("GENMESH_DEV_API_KEY", raising=False)
    assert cli.main(["gateway", "render", "--deployment", str(COMPOSE_DEPLOYMENT)]) == 2
    assert "tenant dev has an empty API key" in capsys.readouterr().err


def test_render_to_a_file_and_envoy_accepts_it(tmp_path, dev_key):
    out = tmp_path / "envoy.yaml"
    assert cli.main(["gateway", "render", "--deployment", str(COMPOSE_DEPLOYMENT),
                     "-o", str(out)]) == 0
    validate(out)
    assert out.read_text() == render(deploy.load(COMPOSE_DEPLOYMENT))


def test_render_run_dir_writes_the_live_layout_that_rollout_edits(tmp_path, dev_key, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(["gateway", "render", "--deployment", str(COMPOSE_DEPLOYMENT),
                     "--run-dir", str(run_dir)]) == 0
    saved = run_dir / "deployment.yaml"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600  # it holds the expanded keys
    assert deploy.load(saved) == deploy.load(COMPOSE_DEPLOYMENT)
    bootstrap = yaml.safe_load((run_dir / "envoy.yaml").read_text())
    lds = bootstrap["dynamic_resources"]["lds_config"]["path_config_source"]["path"]
    assert lds == str(run_dir / "xds" / "listeners.yaml")
    assert {p.name for p in (run_dir / "xds").iterdir()} == {
        "clusters.yaml", "listeners.yaml", "routes-edge.yaml", "routes-mesh.yaml"}
    assert yaml.safe_load((run_dir / "ratelimit.yaml").read_text()) == ratelimits.service_limits(
        deploy.load(COMPOSE_DEPLOYMENT))
    validate(run_dir / "envoy.yaml")
    # `genmesh rollout` works on it as on a `genmesh up` run directory.
    capsys.readouterr()
    assert cli.main(["rollout", "--run-dir", str(run_dir), "canary", "25"]) == 0
    routes = (run_dir / "xds" / "routes-mesh.yaml").read_text()
    assert "weight: 2500" in routes and "weight: 7500" in routes
    assert deploy.load(saved).rollout.canary_percent == 25.0


def test_render_refuses_output_and_run_dir_together(tmp_path, dev_key, capsys):
    assert cli.main(["gateway", "render", "--deployment", str(COMPOSE_DEPLOYMENT),
                     "-o", str(tmp_path / "a.yaml"), "--run-dir", str(tmp_path / "run")]) == 2
    assert "not both" in capsys.readouterr().err


def test_limits_prints_the_rate_limit_services_file(dev_key, capsys):
    assert cli.main(["gateway", "limits", "--deployment", str(K8S_DEPLOYMENT)]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == ratelimits.service_limits(
        deploy.load(K8S_DEPLOYMENT))


def test_run_renders_then_becomes_envoy(tmp_path, dev_key, monkeypatch):
    exec_calls = []

    def fake_execv(path, argv):
        exec_calls.append((path, list(argv)))
        raise SystemExit(0)  # execv does not return

    monkeypatch.setattr(gateway_command.os, "execv", fake_execv)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit):
        cli.main(["gateway", "run", "--deployment", str(COMPOSE_DEPLOYMENT),
                  "--run-dir", str(run_dir)])
    expected = envoy_command(run_dir / "envoy.yaml", base_id=8080, log_level="warning")
    assert exec_calls == [(expected[0], expected)]
    assert (run_dir / "xds" / "clusters.yaml").exists()


def test_run_defaults_to_the_run_dir_rollout_reads():
    args = gateway_command.build_parser().parse_args(
        ["run", "--deployment", "/etc/genmesh/deployment.yaml"])
    rollout_args = gateway_command.build_parser().parse_args(["rollout", "status"])
    assert args.run_dir == rollout_args.run_dir


def test_the_gateway_commands_run_without_pytorch(tmp_path):
    """`python -m genmesh.commands.gateway`, as in the gateway image (no PyTorch there)."""
    script = ("import runpy, sys\n"
              "for name in ('torch', 'numpy', 'transformers', 'sentence_transformers'):\n"
              "    sys.modules[name] = None\n"
              "sys.argv = ['genmesh-gateway', 'render', '--deployment', sys.argv[1]]\n"
              "runpy.run_module('genmesh.commands.gateway', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", script, str(COMPOSE_DEPLOYMENT)],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "GENMESH_DEV_API_KEY": KEY},
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert yaml.safe_load(result.stdout)["static_resources"]["listeners"]


def test_gateway_is_a_command_of_the_cli():
    args = cli.build_parser().parse_args(["gateway", "limits", "--deployment", "x.yaml"])
    assert args.func is gateway_command._limits
