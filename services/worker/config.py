"""The worker's configuration, read once at the entry point."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

from services.worker.engine.config import Backend


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    host: str = "127.0.0.1"
    port: int = 50061
    model: str = "smollm2-135m-instruct"  # store name, HF folder, or a preset with dummy
    model_name: str = ""  # the name served to clients; empty: the model's store name
    model_version: str = "v1"  # the version label of this worker pool
    backend: Backend = Backend.NATIVE
    dtype: str = "bfloat16"
    device: str = "cpu"
    load_format: str = "auto"  # "dummy": random weights (benchmarks, tests)
    kv_cache_gib: float = 1.0
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512
    shutdown_grace_s: float = 10.0  # how long in-flight streams may finish on SIGTERM
    log_level: str = "INFO"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def served_name(self) -> str:
        return self.model_name or self.model


ENV_PREFIX = "GENMESH_WORKER_"


def load_config(argv: list[str] | None, environ: Mapping[str, str]) -> WorkerConfig:
    """Defaults, overridden by ``GENMESH_WORKER_<FIELD>`` variables, then by flags."""
    defaults = WorkerConfig()
    parser = argparse.ArgumentParser(prog="genmesh-worker", description="the worker service")
    for name in WorkerConfig.__dataclass_fields__:
        default = getattr(defaults, name)
        env = environ.get(ENV_PREFIX + name.upper())
        kind = type(default) if not isinstance(default, Backend) else Backend
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind,
                            default=kind(env) if env is not None else default)
    return WorkerConfig(**vars(parser.parse_args(argv)))
