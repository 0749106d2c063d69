"""The worker's configuration, read once at the entry point."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.config import parse_config
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
    # Torch CPU threads; 0: torch's default (every core). Workers sharing a machine must
    # split its cores: threads that outnumber cores spin against each other.
    num_threads: int = 0
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512
    # Where every finished generation's tokens and timings are recorded (a Redis stream),
    # so a shadow version can be compared with the primary; empty: nothing is recorded.
    record_redis_url: str = ""
    shutdown_grace_s: float = 10.0  # how long in-flight streams may finish on SIGTERM
    otlp_endpoint: str = ""  # host:port of an OTLP/gRPC trace collector; "": no tracing
    trace_sample_ratio: float = 1.0  # share of new traces kept (a caller's choice wins)
    metrics_port: int = 0  # the Prometheus endpoint on `host`; 0: none
    # USD per hour of this worker's device, for the cost estimate; 0: no cost series
    # (device seconds are still counted).
    price_per_device_hour: float = 0.0
    log_level: str = "INFO"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def served_name(self) -> str:
        return self.model_name or self.model

    @property
    def is_gpu(self) -> bool:
        """Whether this worker computes on a GPU (then its metrics include NVML's)."""
        return self.backend is Backend.TENSORRT_LLM or self.device.startswith("cuda")


ENV_PREFIX = "GENMESH_WORKER_"


def load_config(argv: list[str] | None, environ: Mapping[str, str]) -> WorkerConfig:
    """Defaults, overridden by ``GENMESH_WORKER_<FIELD>`` variables, then by flags."""
    return parse_config(WorkerConfig, env_prefix=ENV_PREFIX, prog="genmesh-worker",
                        description="the worker service", argv=argv, environ=environ)
