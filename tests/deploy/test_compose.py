"""docker-compose.yml against the code it runs: no drift.

Every service runs a module that exists; every GENMESH_* variable is a field of that
service's config (parsed by the service's own config class) or a variable the
deployment description reads; ports are the deployment's and the launcher's; volumes are
declared; health checks and ``depends_on`` conditions name real things; the compose
deployment description renders through ``gateway/`` and Envoy accepts it. Then the file
itself goes through Debian's ``docker-compose config -q`` and the Compose Specification's
JSON schema (check-jsonschema), both offline: no Docker engine runs here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import ratelimits
from gateway.envoy import clusters, render, validate
from gateway.metrics import ADMIN_CLUSTER
from genmesh.commands import gateway as gateway_command
from genmesh.core import deployment as deploy
from genmesh.core.deployment import Deployment
from genmesh.launcher import prometheus
from genmesh.launcher.plan import MeshConfig
from genmesh.security import pki
from tests.deploy.test_dockerfiles import (
    DOCKERFILE,
    GPU_DOCKERFILE,
    HTTP_HEALTH_PATHS,
    SERVICE_PORTS,
    config_class,
    health_probe,
    healthcheck_argv,
    parse_dockerfile,
)
from tests.procs import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
DEPLOYMENT_FILE = REPO_ROOT / "deploy" / "compose" / "deployment.yaml"
COMPOSE = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
# Variables read outside the services' config dataclasses, by where they are read.
STORE_VARIABLE = "GENMESH_MODEL_STORE"  # genmesh/core/models/store.py:default_store_root
DEPLOYMENT_MOUNT = "/etc/genmesh/deployment.yaml"
SECRET_NAME = re.compile(r"(?:^|_)(?:KEY|PASSWORD|SECRET|TOKEN)$")
SECRETS_DIR = "/etc/genmesh/secrets"  # the deployment's security.secrets_dir
# Each container's mesh identity: every worker version is "worker".
IDENTITY = {"envoy": "envoy", "frontend": "frontend", "httpapi": "httpapi",
            "tokenizer": "tokenizer", "safety": "safety", "cache": "cache",
            "ratelimit": "ratelimit", "worker": "worker", "worker-candidate": "worker",
            "worker-gpu": "worker", "worker-candidate-gpu": "worker"}


# ---- helpers (tests/deploy/test_k8s.py uses them too) -------------------------------------

_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}`` and
    ``$$``; a required variable that is unset raises KeyError."""
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.groups()
        value = env.get(name)
        if (op in (":-", ":?") and not value) or (op in ("-", "?") and value is None):
            if op and op.endswith("?"):
                raise KeyError(f"{name}: {arg}")
            return arg or ""
        return value or ""
    return _INTERPOLATION.sub(one, str(text))


def check_health_port(cfg: Any, exposed_ports: set[int]) -> int:
    """A service with the mesh's secrets admits Envoy's certificate alone: its probes ask
    its health port, plaintext on the container's loopback, exposed to nobody."""
    assert cfg.secrets_dir and cfg.health_port > 0, type(cfg).SERVICE
    assert cfg.health_port not in {cfg.port, cfg.metrics_port} | exposed_ports
    return int(cfg.health_port)


def interpolated_names(text: str) -> set[str]:
    return {m.group(1) for m in _INTERPOLATION.finditer(text) if m.group(1)}


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


EXAMPLE_ENV = read_env_file(ENV_EXAMPLE)


def deployment_variables(path: Path) -> set[str]:
    """The environment variables a deployment description reads (``${VAR}``)."""
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", path.read_text()))


def load_deployment(path: Path) -> Deployment:
    """The description with every variable it reads set to a test value."""
    return deploy.load(path, environ={v: f"test-{v.lower()}" for v in deployment_variables(path)})


def check_service_env(module: str, env: Mapping[str, str], *, deployment_vars: set[str]
                      ) -> Any:
    """The config ``module``'s service builds from ``env`` with its own config class,
    after checking that every GENMESH_* variable is one of its fields, the model store's,
    or one the deployment description reads."""
    config = config_class(module)
    fields = {f.name for f in dataclasses.fields(config)}
    for key in env:
        if not key.startswith("GENMESH_"):
            continue
        if key.startswith(config.env_prefix()):
            field_name = key.removeprefix(config.env_prefix()).lower()
            assert field_name in fields, (
                f"{key}: {module} has no setting {field_name!r} (fields: {sorted(fields)})")
        else:
            assert key == STORE_VARIABLE or key in deployment_vars, (
                f"{key} is read neither by {module}'s config nor by the deployment description")
    return config.load([], dict(env))


def deployment_ports(dep: Deployment) -> dict[str, list[tuple[str, int]]]:
    """Deployment service name (frontend, worker-v1, ...) -> its endpoints."""
    out = {f.name: list(getattr(dep.services, f.name))
           for f in dataclasses.fields(dep.services)}
    for v in dep.versions:
        out[v.cluster] = list(v.workers)
    return out


# Which deployment endpoint and which launcher ports each entry module serves.
LAUNCHER_WORKER_PORTS = {"v1": ("worker_port", "worker_metrics_port"),
                         "v2": ("candidate_port", "candidate_metrics_port")}


# ---- compose, resolved -------------------------------------------------------------------

def image_stage(service: dict[str, Any]) -> Any:
    build = service["build"]
    path = REPO_ROOT / build["dockerfile"]
    stages = parse_dockerfile(path)
    return stages[build["target"]] if "target" in build else list(stages.values())[-1]


def genmesh_services() -> dict[str, dict[str, Any]]:
    """The services built from this repository's Dockerfiles."""
    return {name: s for name, s in SERVICES.items() if "build" in s}


def effective_env(service: dict[str, Any]) -> dict[str, str]:
    """The image's ENV overlaid by the service's environment, interpolated with .env.example."""
    env = {k: v for k, v in image_stage(service).env.items() if k.startswith("GENMESH_")}
    for key, value in (service.get("environment") or {}).items():
        env[key] = interpolate(str(value), EXAMPLE_ENV)
    return env


def entrypoint_and_command(service: dict[str, Any]) -> list[str]:
    stage = image_stage(service)
    entrypoint = service.get("entrypoint", stage.entrypoint)
    command = service.get("command", stage.cmd if "entrypoint" not in service else [])
    return [*entrypoint, *command]


def runs_module(service: dict[str, Any]) -> str | None:
    if "build" not in service:
        return None
    argv = entrypoint_and_command(service)
    if len(argv) >= 3 and argv[0] in ("python", "python3") and argv[1] == "-m":
        return argv[2]
    return None


def names_of(name: str, service: dict[str, Any]) -> set[str]:
    """The DNS names a service answers to on the compose network."""
    aliases = set()
    for network in (service.get("networks") or {}).values():
        aliases |= set((network or {}).get("aliases", []))
    return {name} | aliases


def published(service: dict[str, Any]) -> dict[int, str]:
    """Container port -> host address, of the service's ``ports``."""
    out = {}
    for entry in service.get("ports", []):
        parts = interpolate(entry, EXAMPLE_ENV).split(":")
        out[int(parts[-1])] = parts[0] if len(parts) == 3 else "0.0.0.0"
    return out


def exposed(service: dict[str, Any]) -> set[int]:
    return {int(p) for p in service.get("expose", [])} | set(published(service))


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read-only) of the service's short-syntax volumes."""
    out = {}
    for entry in service.get("volumes", []):
        source, target, *mode = entry.split(":")
        out[target] = (source, mode == ["ro"])
    return out


DEP = load_deployment(DEPLOYMENT_FILE)
DEFAULTS = MeshConfig()


# ---- the tests ---------------------------------------------------------------------------

def test_compose_runs_every_process_of_the_mesh():
    assert {"envoy", "frontend", "httpapi", "tokenizer", "safety", "cache", "worker",
            "worker-candidate", "ratelimit", "redis", "jaeger", "prometheus",
            "grafana"} <= set(SERVICES)
    assert set(SERVICES) - {"envoy", "frontend", "httpapi", "tokenizer", "safety", "cache",
                            "worker", "worker-candidate", "ratelimit", "redis", "jaeger",
                            "prometheus", "grafana"} == {"worker-gpu", "worker-candidate-gpu",
                                                        "model-store"}


def test_every_genmesh_service_runs_a_module_that_exists_from_a_real_target():
    for name, service in genmesh_services().items():
        build = service["build"]
        assert build["context"] == "."
        assert (REPO_ROOT / build["dockerfile"]).resolve() in (DOCKERFILE, GPU_DOCKERFILE)
        if "target" in build:
            assert build["target"] in parse_dockerfile(DOCKERFILE), name
        image, _, tag = service["image"].partition(":")
        assert image.startswith("genmesh/") and interpolate(tag, {}) == VERSION, name
        if name == "model-store":
            argv = entrypoint_and_command(service)
            assert argv[:2] == ["sh", "/app/deploy/docker/model-store.sh"]
            assert (REPO_ROOT / argv[1].removeprefix("/app/")).is_file()
            continue
        module = runs_module(service)
        assert module is not None and importlib.util.find_spec(module) is not None, name
    envoy = SERVICES["envoy"]
    assert runs_module(envoy) == "genmesh.commands.gateway"
    args = gateway_command.build_parser().parse_args(entrypoint_and_command(envoy)[3:])
    assert args.func.__name__ == "_run" and str(args.deployment) == DEPLOYMENT_MOUNT
    assert mounts(envoy)[DEPLOYMENT_MOUNT] == ("./deploy/compose/deployment.yaml", True)


def test_every_genmesh_variable_is_a_real_setting_and_parses():
    deployment_vars = deployment_variables(DEPLOYMENT_FILE)
    assert deployment_vars == {"GENMESH_DEV_API_KEY"}
    for name, service in genmesh_services().items():
        module = runs_module(service)
        env = effective_env(service)
        if module in SERVICE_PORTS:
            check_service_env(module, env, deployment_vars=deployment_vars)
        else:  # the gateway and the model-store job read no service config
            assert set(env) <= deployment_vars | {STORE_VARIABLE}, (name, sorted(env))


def _config(name: str) -> Any:
    service = SERVICES[name]
    return check_service_env(runs_module(service) or "", effective_env(service),
                             deployment_vars=deployment_variables(DEPLOYMENT_FILE))


def test_service_ports_are_the_deployments_and_the_launchers():
    endpoints = deployment_ports(DEP)
    for name in ("frontend", "httpapi", "tokenizer", "safety", "cache", "ratelimit"):
        cfg = _config(name)
        port_field, metrics_field = SERVICE_PORTS[f"services.{name}.main"]
        assert cfg.host == "0.0.0.0", name
        assert endpoints[name] == [(name, cfg.port)], name
        assert cfg.port == getattr(DEFAULTS, port_field), name
        assert cfg.metrics_port == getattr(DEFAULTS, metrics_field), name
        assert exposed(SERVICES[name]) >= {cfg.port, cfg.metrics_port}, name
    g = DEP.gateway
    assert (g.host, g.edge_port, g.mesh_port, g.admin_port) == (
        "0.0.0.0", DEFAULTS.edge_port, DEFAULTS.mesh_port, DEFAULTS.admin_port)
    # Admin (no authentication) on the container's loopback alone: published nowhere,
    # reached by no other container; Prometheus scrapes the metrics listener.
    assert g.admin_host == "127.0.0.1" and g.metrics_port == 9902
    envoy = SERVICES["envoy"]
    assert published(envoy) == {g.edge_port: "127.0.0.1"}
    assert exposed(envoy) >= {g.mesh_port, g.metrics_port}
    frontend = _config("frontend")
    for field_name in ("tokenizer_address", "worker_address", "safety_address", "cache_address"):
        assert getattr(frontend, field_name) == f"envoy:{g.mesh_port}", field_name
    assert frontend.deployment_file == DEPLOYMENT_MOUNT
    assert mounts(SERVICES["frontend"])[DEPLOYMENT_MOUNT] == ("./deploy/compose/deployment.yaml",
                                                              True)


def test_http_api_calls_the_frontend_through_the_mesh_and_envoy_probes_its_health():
    """The HTTP API (HTTP/1.1, behind the edge's /v1/): its own image and entry module, the
    frontend through Envoy's mesh listener (a frontend admits Envoy alone; the edge has
    already checked the key), started once the frontend is healthy, its HTTPS port
    admitting Envoy alone, its GET /healthz asked by Envoy there and by Docker on the
    health port (plaintext, loopback), and given longer than its drain to stop."""
    service = SERVICES["httpapi"]
    assert service["build"] == {"context": ".", "dockerfile": "deploy/docker/Dockerfile",
                                "target": "httpapi"}
    assert service["image"] == "genmesh/httpapi:${IMAGE_TAG:-0.1.0}"
    assert entrypoint_and_command(service) == ["python", "-m", "services.httpapi.main"]
    cfg = _config("httpapi")
    assert cfg.frontend_address == f"envoy:{DEP.gateway.mesh_port}" == "envoy:8081"
    assert (cfg.host, cfg.port, cfg.metrics_port) == (
        "0.0.0.0", DEFAULTS.httpapi_port, DEFAULTS.httpapi_metrics_port)
    assert DEP.services.httpapi == (("httpapi", cfg.port),)
    # Reached through Envoy only: exposed on the compose network, published nowhere.
    assert exposed(service) == {cfg.port, cfg.metrics_port} and not published(service)
    assert service["depends_on"] == {"frontend": {"condition": "service_healthy"}}
    health_path = HTTP_HEALTH_PATHS["services.httpapi.main"]
    health_port = check_health_port(cfg, exposed(service))
    assert service["healthcheck"]["test"] == [
        "CMD", "python", "/app/deploy/docker/probe.py", "http",
        f"http://127.0.0.1:{health_port}{health_path}"]
    [envoy_cluster] = [c for c in clusters(DEP) if c["name"] == "httpapi"]
    [envoy_check] = envoy_cluster["health_checks"]
    assert envoy_check["http_health_check"]["path"] == health_path
    [endpoint] = envoy_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {
        "address": "httpapi", "port_value": cfg.port}
    grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
    assert grace is not None and int(grace.group(1)) > cfg.shutdown_grace_s
    # No API keys, no files but its own certificate: the edge stamps the tenant, the
    # frontend holds the rest.
    assert "volumes" not in service
    assert not [k for k in service["environment"] if SECRET_NAME.search(k)]


def test_every_service_drains_within_dockers_stop_grace_period():
    """Docker SIGKILLs a service stop_grace_period after SIGTERM (10 s by default): each
    service's own drain (shutdown_grace_s) must end before that."""
    for name, service in genmesh_services().items():
        module = runs_module(service)
        if module is None or not module.startswith("services."):
            continue
        cfg = check_service_env(module, effective_env(service),
                                deployment_vars=deployment_variables(DEPLOYMENT_FILE))
        grace = re.fullmatch(r"(\d+)s", service.get("stop_grace_period", "10s"))
        assert grace is not None and int(grace.group(1)) > cfg.shutdown_grace_s, name


def test_workers_serve_the_deployments_versions_in_both_profiles():
    versions = {v.name: v for v in DEP.versions}
    assert set(versions) == set(LAUNCHER_WORKER_PORTS)
    seen: dict[str, set[str]] = {"cpu": set(), "gpu": set()}
    for name, service in genmesh_services().items():
        if runs_module(service) != "services.worker.main":
            continue
        [profile] = service["profiles"]
        cfg = _config(name)
        version = versions[cfg.model_version]
        [(host, port)] = version.workers
        assert host in names_of(name, service), f"{name} does not answer to {host}"
        port_field, metrics_field = LAUNCHER_WORKER_PORTS[version.name]
        assert cfg.host == "0.0.0.0"
        assert cfg.port == port == getattr(DEFAULTS, port_field), name
        assert cfg.metrics_port == getattr(DEFAULTS, metrics_field), name
        assert exposed(service) >= {cfg.port, cfg.metrics_port}, name
        assert cfg.model == DEP.model
        assert cfg.record_redis_url == DEP.redis_url
        assert cfg.price_per_device_hour == DEP.observability.price_per_device_hour
        if profile == "cpu":
            assert (cfg.backend.value, cfg.device, cfg.dtype) == ("native", "cpu", version.dtype)
            assert service["build"]["target"] == "worker"
        else:
            assert profile == "gpu"
            assert (cfg.backend.value, cfg.device) == ("tensorrt_llm", "cuda")
            assert cfg.dtype in ("bfloat16", "float16")
            assert service["build"]["dockerfile"] == "deploy/docker/worker-gpu.Dockerfile"
            [device] = service["deploy"]["resources"]["reservations"]["devices"]
            assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        seen[profile].add(version.name)
    assert seen == {"cpu": set(versions), "gpu": set(versions)}
    for name, service in SERVICES.items():  # nothing but the workers is profile-bound
        if runs_module(service) != "services.worker.main":
            assert "profiles" not in service, name
    assert EXAMPLE_ENV["COMPOSE_PROFILES"] == "cpu"


def test_redis_jaeger_and_every_url_agree():
    assert DEP.redis_url == f"redis://redis:{DEFAULTS.redis_port}/0"
    redis = SERVICES["redis"]
    assert redis["command"][redis["command"].index("--port") + 1] == str(DEFAULTS.redis_port)
    assert DEFAULTS.redis_port in exposed(redis)
    assert _config("cache").redis_url == DEP.redis_url
    assert _config("ratelimit").redis_url == DEP.redis_url
    assert _config("safety").audit_redis_url == DEP.redis_url
    assert (_config("cache").default_ttl_s, _config("cache").max_memory_mb) == (
        DEP.limits.cache_ttl_s, DEP.limits.cache_max_memory_mb)
    otlp_host, otlp_port = deploy.parse_endpoint(DEP.observability.otlp_endpoint)
    assert otlp_host == "jaeger" and otlp_port in exposed(SERVICES["jaeger"])
    assert SERVICES["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    for name, service in genmesh_services().items():
        if runs_module(service) in SERVICE_PORTS:
            cfg = _config(name)
            assert cfg.otlp_endpoint == DEP.observability.otlp_endpoint, name
            assert cfg.trace_sample_ratio == DEP.observability.trace_sample_percent / 100, name


def test_rate_limit_file_is_what_gateway_renders():
    ratelimit = SERVICES["ratelimit"]
    limits_path = _config("ratelimit").limits_file
    source, read_only = mounts(ratelimit)[limits_path]
    assert read_only
    assert yaml.safe_load((REPO_ROOT / source).read_text()) == ratelimits.service_limits(DEP), (
        f"{source} is stale: rerun `genmesh gateway limits --deployment {DEPLOYMENT_FILE}`")


def test_prometheus_scrapes_every_service_as_the_launcher_names_them():
    targets: dict[str, list[str]] = {}
    for name in ("frontend", "tokenizer", "safety", "cache", "httpapi"):
        targets[name] = [f"{name}:{_config(name).metrics_port}"]
    for v in DEP.versions:
        [(host, _)] = v.workers
        worker_name = next(n for n, s in SERVICES.items()
                           if "cpu" in s.get("profiles", []) and host in names_of(n, s))
        targets[v.cluster] = [f"{host}:{_config(worker_name).metrics_port}"]
    targets["ratelimit"] = [f"ratelimit:{_config('ratelimit').metrics_port}"]
    expected = prometheus.scrape_config(targets,
                                        envoy_admin=f"envoy:{DEP.gateway.metrics_port}")
    service = SERVICES["prometheus"]
    source, _ = mounts(service)["/etc/prometheus/prometheus.yml"]
    assert yaml.safe_load((REPO_ROOT / source).read_text()) == expected, (
        f"{source} differs from what genmesh.launcher.prometheus renders for compose")
    assert "--config.file=/etc/prometheus/prometheus.yml" in service["command"]


def test_grafana_is_provisioned_from_the_repository():
    grafana = SERVICES["grafana"]
    m = mounts(grafana)
    assert m["/etc/grafana/provisioning"] == ("./deploy/grafana/provisioning", True)
    providers = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/dashboards/genmesh.yaml")
                               .read_text())
    [provider] = providers["providers"]
    assert m[provider["options"]["path"]] == ("./deploy/grafana/dashboards", True)
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (REPO_ROOT / "deploy/grafana/dashboards" / Path(home).name).is_file()
    datasources = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/datasources/"
                                  "prometheus.yaml").read_text())
    url = datasources["datasources"][0]["url"]
    host, port = url.removeprefix("http://").split(":")
    assert host == "prometheus" and int(port) in exposed(SERVICES["prometheus"])


def test_volumes_are_declared_and_mounted_where_the_code_looks():
    declared = set(COMPOSE.get("volumes", {}))
    used = set()
    for name, service in SERVICES.items():
        for target, (source, _) in mounts(service).items():
            if source.startswith("."):
                assert (REPO_ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} mounts undeclared volume {source}"
                used.add(source)
            assert target.startswith("/"), name
    assert used == declared == {"model-store", "redis-data", "prometheus-data"}
    assert mounts(SERVICES["redis"])["/data"] == ("redis-data", False)
    assert mounts(SERVICES["model-store"])["/models"] == ("model-store", False)
    for name, service in genmesh_services().items():
        env = effective_env(service)
        needs_store = runs_module(service) in ("services.tokenizer.main", "services.worker.main")
        if needs_store:
            assert mounts(service)[env[STORE_VARIABLE]] == ("model-store", True), name
            assert service["depends_on"]["model-store"] == {
                "condition": "service_completed_successfully"}, name
    assert "GENMESH_MODEL_STORE" in (REPO_ROOT / "genmesh/core/models/store.py").read_text()


def test_health_checks_probe_each_services_own_port():
    for name, service in genmesh_services().items():
        if name == "model-store":
            assert "healthcheck" not in service and service["restart"] == "no"
            continue
        argv = service["healthcheck"]["test"]
        assert argv[0] == "CMD" and argv[2] == "/app/deploy/docker/probe.py", name
        module = runs_module(service)
        if module in SERVICE_PORTS:  # a genmesh service: its health port
            cfg = _config(name)
            port = cfg.port
            assert argv[3:] == health_probe(module, check_health_port(cfg, exposed(service)))
            # The image's own HEALTHCHECK names the service's port (probe.py asks the
            # health port instead where the service has one), the same port wherever
            # compose keeps the image's ports.
            image_env = image_stage(service).env
            if all(image_env.get(k) == v for k, v in effective_env(service).items()
                   if k.endswith("_PORT")):
                assert healthcheck_argv(image_stage(service))[2:] == health_probe(
                    module, port), name
        else:
            assert argv[3:] == ["http", f"http://127.0.0.1:{DEP.gateway.admin_port}/ready"]
            assert argv[1:] == healthcheck_argv(image_stage(service))
    assert SERVICES["prometheus"]["healthcheck"]["test"][0] == "CMD"
    # Redis without a user answers NOAUTH: up (a shell pipe, no password on the line).
    assert SERVICES["redis"]["healthcheck"]["test"] == [
        "CMD-SHELL", "redis-cli -p 6390 ping | grep -qE 'PONG|NOAUTH'"]


def test_depends_on_names_real_services_with_meaningful_conditions():
    graph: dict[str, set[str]] = {}
    for name, service in SERVICES.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: use depends_on with conditions"
        graph[name] = set(depends)
        for target, spec in depends.items():
            assert target in SERVICES, f"{name} depends on unknown {target}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[target], f"{target} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert SERVICES[target].get("restart") == "no", target
            else:
                assert condition == "service_started", condition
            # A service may only wait for one that runs whenever it runs.
            needed = set(service.get("profiles", []))
            offered = set(SERVICES[target].get("profiles", []))
            assert not offered or (needed and needed <= offered), f"{name} -> {target}"

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"depends_on cycle: {' -> '.join((*path, node))}"
        for nxt in graph[node]:
            visit(nxt, (*path, node))

    for name in graph:
        visit(name, ())


def test_compose_deployment_renders_through_gateway_and_envoy_accepts_it(tmp_path):
    names = set()
    for name, service in SERVICES.items():
        names |= names_of(name, service)
    for service_name, endpoints in deployment_ports(DEP).items():
        for host, _ in endpoints:
            assert host in names, f"{service_name}: {host} is no compose service"
    # Names, re-resolved; but Envoy's own admin, behind the metrics listener, on loopback.
    assert {c["type"] for c in clusters(DEP) if c["name"] != ADMIN_CLUSTER} == {"STRICT_DNS"}
    # The edge routes to the frontend and the HTTP API only; the mesh reaches every
    # internal service.
    secrets = pki.ensure(tmp_path / "secrets")  # Envoy reads the files it is given
    assert DEP.security.mtls and DEP.security.secrets_dir == SECRETS_DIR
    dep = dataclasses.replace(DEP, security=dataclasses.replace(
        DEP.security, secrets_dir=str(secrets.directory)))
    routed = validated_routes(dep, tmp_path)
    assert routed["edge"] == {"frontend", "httpapi"}
    assert routed["mesh"] == {"tokenizer", "safety", "cache", "worker-v1", "worker-v2",
                              "frontend"}  # the HTTP API's calls


def validated_routes(dep: Deployment, tmp_path: Path) -> dict[str, set[str]]:
    """Listener name → the clusters its routes reach, in ``dep``'s rendering by
    ``gateway/``, which Envoy must accept first."""
    path = tmp_path / "envoy.yaml"
    path.write_text(render(dep))
    validate(path)
    static = yaml.safe_load(path.read_text())["static_resources"]
    routed = {}
    for listener in static["listeners"]:
        config = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
        routed[listener["name"]] = {cluster for vh in config["virtual_hosts"]
                                    for r in vh["routes"] for cluster in route_clusters(r)}
    return routed


def route_clusters(route: dict[str, Any]) -> set[str]:
    """Every cluster an Envoy route may send a call to (weighted, mirrored)."""
    action = route.get("route", {})
    out = {action["cluster"]} if "cluster" in action else set()
    out |= {c["name"] for c in action.get("weighted_clusters", {}).get("clusters", [])}
    out |= {m["cluster"] for m in action.get("request_mirror_policies", [])}
    return out


def test_no_secret_is_written_in_the_compose_files():
    text = COMPOSE_FILE.read_text()
    for name, service in SERVICES.items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", str(value)), (
                    f"{name}: {key} must come from .env, required (${{VAR:?...}})")
    for tenant in yaml.safe_load(DEPLOYMENT_FILE.read_text())["tenants"].values():
        for key in tenant["api_keys"]:
            assert re.fullmatch(r"\$\{[A-Z0-9_]+\}", key), "keys: ${VAR} without a default"
    # .env.example names every variable the compose file reads, secrets as placeholders.
    assert interpolated_names(text) <= set(EXAMPLE_ENV), (
        interpolated_names(text) - set(EXAMPLE_ENV))
    assert set(EXAMPLE_ENV) - {"COMPOSE_PROFILES"} <= interpolated_names(text)
    for key, value in EXAMPLE_ENV.items():
        if SECRET_NAME.search(key):
            assert value.startswith("change-me"), f".env.example holds a real-looking {key}"
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO_ROOT,
                             check=False).returncode
    assert ignored == 0, ".env must be ignored by git"


def _clean_env() -> dict[str, str]:
    """The environment of a validator: no variable of ours leaking in from the shell."""
    return {k: v for k, v in os.environ.items()
            if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}


DOCKER_COMPOSE = shutil.which("docker-compose")


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason="Debian's docker-compose is not installed "
                    "(.ci/run installs it: apt install docker-compose)")
def test_docker_compose_config_accepts_the_file(tmp_path):
    for profile in ("cpu", "gpu"):
        env = {**_clean_env(), "COMPOSE_PROFILES": profile}
        result = subprocess.run(
            [str(DOCKER_COMPOSE), "--project-directory", str(REPO_ROOT), "-f", str(COMPOSE_FILE),
             "--env-file", str(ENV_EXAMPLE), "config", "-q"],
            capture_output=True, text=True, env=env, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
    # Without the keys it refuses, naming the fix.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = subprocess.run(
        [str(DOCKER_COMPOSE), "--project-directory", str(REPO_ROOT), "-f", str(COMPOSE_FILE),
         "--env-file", str(empty), "config", "-q"],
        capture_output=True, text=True, env=_clean_env(), timeout=120, check=False)
    assert result.returncode != 0 and ".env.example" in result.stderr


CHECK_JSONSCHEMA = shutil.which("check-jsonschema",
                                path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")


@pytest.mark.skipif(CHECK_JSONSCHEMA is None, reason="check-jsonschema is not installed "
                    "(the dev extra brings it)")
def test_compose_file_matches_the_compose_specification_schema():
    result = subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def mounted_secrets(service: dict[str, Any]) -> dict[str, str]:
    """Target path -> the file of .secrets/ mounted there."""
    files = COMPOSE["secrets"]
    return {m["target"]: files[m["source"]]["file"] for m in service.get("secrets", [])}


def test_each_container_mounts_only_its_own_key_and_never_a_ca_key(tmp_path):
    """Envoy and every genmesh service mount their own certificate and key, both CAs'
    certificates and their own Redis password, and set their secrets directory; no other
    container holds a key or a password; every file is one `genmesh secrets init` makes."""
    assert DEP.security.mtls and DEP.security.secrets_dir == SECRETS_DIR
    services = {n for n, s in genmesh_services().items()
                if (runs_module(s) or "").startswith("services.")}
    assert set(IDENTITY) == services | {"envoy"}
    for name, identity in IDENTITY.items():
        expected = {f"{SECRETS_DIR}/{f}": f"./.secrets/{f}" for f in (
            f"{identity}.pem", f"{identity}.key", "gateway-ca.pem", "service-ca.pem")}
        if identity in pki.REDIS_KEYS:
            expected[f"{SECRETS_DIR}/redis-{identity}.password"] = (
                f"./.secrets/redis-{identity}.password")
        assert mounted_secrets(SERVICES[name]) == expected, name
        if name != "envoy":  # Envoy reads its directory from the deployment
            [variable] = [k for k in SERVICES[name]["environment"]
                          if k.endswith("_SECRETS_DIR")]
            assert SERVICES[name]["environment"][variable] == SECRETS_DIR
            assert _config(name).secrets_dir == SECRETS_DIR
    for name in set(SERVICES) - set(IDENTITY):
        assert not [f for f in mounted_secrets(SERVICES[name]).values()
                    if f.endswith((".key", ".password"))], name
    made = pki.ensure(tmp_path / "secrets").directory
    declared = {spec["file"] for spec in COMPOSE["secrets"].values()}
    assert all(f.startswith("./.secrets/") and "/ca/" not in f for f in declared)
    assert all((made / f.removeprefix("./.secrets/")).is_file() for f in declared)
    ignored = subprocess.run(["git", "check-ignore", "-q", ".secrets/x.key"], cwd=REPO_ROOT,
                             check=False).returncode
    assert ignored == 0, ".secrets/ must be ignored by git"


def test_redis_has_no_default_user_and_reads_the_acl_file_from_secrets():
    """Redis loads the ACL file (default user off, one user per service) from its only
    secret; the services that use it log in as themselves, so their URLs name no user."""
    redis = SERVICES["redis"]
    argv = redis["command"]
    acl = argv[argv.index("--aclfile") + 1]
    assert mounted_secrets(redis) == {acl: "./.secrets/redis-users.acl"}
    assert "requirepass" not in " ".join(argv)
    made = pki.redis_acl({u: "x" for u in pki.REDIS_KEYS})
    assert made.splitlines()[0] == "user default off"
    for name, service in genmesh_services().items():
        for key, value in effective_env(service).items():
            if key.endswith("_REDIS_URL"):
                assert value.startswith("redis://redis:") and "@" not in value, (name, key)
                assert IDENTITY[name] in pki.REDIS_KEYS, name
