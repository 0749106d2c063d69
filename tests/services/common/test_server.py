"""The six services' configs and entry points: one ``ServerConfig`` shape, the variable
names and flags operators already use, and one ``run_service``."""

from __future__ import annotations

import dataclasses

import pytest

from genmesh.core.config import ServerConfig
from services.cache.config import CacheConfig
from services.common import server
from services.frontend.config import FrontendConfig
from services.ratelimit.config import RatelimitConfig
from services.safety.config import SafetyConfig
from services.tokenizer.config import TokenizerConfig
from services.worker.config import WorkerConfig

# service name -> (config, default port, default shutdown grace)
SERVICES = {
    "tokenizer": (TokenizerConfig, 50052, 5.0),
    "safety": (SafetyConfig, 50053, 5.0),
    "cache": (CacheConfig, 50054, 5.0),
    "worker": (WorkerConfig, 50061, 10.0),
    "frontend": (FrontendConfig, 50051, 10.0),
    "ratelimit": (RatelimitConfig, 50071, 5.0),
}
SHARED = [f.name for f in dataclasses.fields(ServerConfig)]


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_reads_the_shared_fields_under_its_own_prefix(service):
    config, port, grace = SERVICES[service]
    assert issubclass(config, ServerConfig) and service == config.SERVICE
    assert [f.name for f in dataclasses.fields(config)][:len(SHARED)] == SHARED
    defaults = config.load([], {})
    assert (defaults.host, defaults.port, defaults.shutdown_grace_s) == (
        "127.0.0.1", port, grace)
    prefix = f"GENMESH_{service.upper()}_"
    environ = {prefix + "HOST": "0.0.0.0", prefix + "METRICS_PORT": "9100",
               prefix + "OTLP_ENDPOINT": "collector:4317", prefix + "LOG_LEVEL": "DEBUG"}
    cfg = config.load(["--port", "6000", "--trace-sample-ratio", "0.25",
                       "--shutdown-grace-s", "2"], environ)
    assert (cfg.address, cfg.metrics_port, cfg.otlp_endpoint, cfg.log_level) == (
        "0.0.0.0:6000", 9100, "collector:4317", "DEBUG")
    assert (cfg.trace_sample_ratio, cfg.shutdown_grace_s) == (0.25, 2.0)


def test_service_fields_keep_their_variables_and_flags():
    worker = WorkerConfig.load(["--kv-cache-gib", "0.5"], {
        "GENMESH_WORKER_MODEL_VERSION": "v2", "GENMESH_WORKER_BACKEND": "tensorrt_llm"})
    assert (worker.model_version, worker.kv_cache_gib, worker.is_gpu) == ("v2", 0.5, True)
    frontend = FrontendConfig.load([], {"GENMESH_FRONTEND_MODERATION": "window"})
    assert frontend.moderation.value == "window"
    assert RatelimitConfig.load(["--limits-file", "l.yaml"], {}).limits_file == "l.yaml"
    assert TokenizerConfig.load([], {"GENMESH_TOKENIZER_MODELS": "a, b"}).model_names == (
        "a", "b")


def test_run_service_builds_the_config_sets_up_logs_and_runs(monkeypatch):
    logs, ran = [], []
    monkeypatch.setattr(server, "setup_json_logging",
                        lambda name, level: logs.append((name, level)))
    monkeypatch.setenv("GENMESH_CACHE_MAX_MEMORY_MB", "64")

    async def run(cfg: CacheConfig) -> None:
        ran.append(cfg)

    assert server.run_service(CacheConfig, run, ["--log-level", "WARNING"]) == 0
    assert logs == [("genmesh.cache", "WARNING")]
    [cfg] = ran
    assert isinstance(cfg, CacheConfig) and cfg.max_memory_mb == 64
