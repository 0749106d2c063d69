"""The worker's configuration, read once at the entry point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from genmesh.core.config import ServerConfig
from services.worker.engine.config import Backend


@dataclass(frozen=True, slots=True)
class WorkerConfig(ServerConfig):
    SERVICE: ClassVar[str] = "worker"
    DESCRIPTION: ClassVar[str] = "the worker service"

    port: int = 50061
    shutdown_grace_s: float = 10.0  # how long in-flight streams may finish on SIGTERM
    model: str = "smollm2-135m-instruct"  # store name, HF folder, or a preset with dummy
    model_name: str = ""  # the name served to clients; empty: the model's store name
    model_version: str = "v1"  # the version label of this worker pool
    backend: Backend = Backend.NATIVE
    dtype: str = "bfloat16"
    device: str = "cpu"
    load_format: str = "auto"  # "dummy": random weights (benchmarks, tests)
    kv_cache_gib: float = 1.0
    # Weight-only quantization of the layers' matmuls: none, int8 or int4 (engine/model/
    # quant.py), built at load or taken from `genmesh models pull --quant`'s file; one
    # scale per quant_group_size input columns (-1: the default, int8 in 64s and int4 in
    # 32s; 0: int8 per output channel).
    quantization: str = "none"
    quant_group_size: int = -1
    # Speculative decoding (engine/speculative.py): off, ngram (prompt lookup) or draft
    # (speculative_draft_model, a store name or folder sharing the model's tokenizer,
    # proposes; speculative_draft_quantization: none, int8 or int4, e.g. the model's own
    # int4 build as its draft). speculative_by_default: whether a request that does not
    # say speculates. The tokens are the same either way (greedy, or a seed's draws).
    speculative: str = "off"
    num_speculative_tokens: int = 8
    speculative_draft_model: str = ""
    speculative_draft_quantization: str = "none"
    speculative_by_default: bool = True
    # Torch CPU threads; 0: torch's default (every core). Workers sharing a machine must
    # split its cores: threads that outnumber cores spin against each other.
    num_threads: int = 0
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512
    # The engine core in a process of its own (True) or a thread of the worker (False):
    # a process keeps the gRPC loop's Python off the step loop's GIL.
    engine_process: bool = True
    # Under load (at least stream_interval_min_batch requests running) a stream's tokens
    # go out several at a time, so a step's tokens leave in about
    # stream_replies_per_step replies (at most stream_interval tokens in one), none held
    # longer than stream_interval_max_hold_ms; the first and last replies never wait, and
    # the second carries two tokens at most
    # (services/worker/stream_interval.py). stream_interval 1: every step's tokens at once.
    stream_interval: int = 16
    stream_replies_per_step: int = 4
    stream_interval_min_batch: int = 8
    stream_interval_max_hold_ms: float = 250.0
    # Where every finished generation's tokens and timings are recorded (a Redis stream),
    # so a shadow version can be compared with the primary; empty: nothing is recorded.
    record_redis_url: str = ""
    record_max_entries: int = 20_000  # the stream is trimmed to about this many (oldest first)
    # USD per hour of this worker's device, for the cost estimate; 0: no cost series
    # (device seconds are still counted).
    price_per_device_hour: float = 0.0

    @property
    def served_name(self) -> str:
        return self.model_name or self.model

    @property
    def is_gpu(self) -> bool:
        """Whether this worker computes on a GPU (then its metrics include NVML's)."""
        return self.backend is Backend.TENSORRT_LLM or self.device.startswith("cuda")
