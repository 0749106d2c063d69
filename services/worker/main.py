"""Entry point: ``python -m services.worker.main [--flags]`` (or GENMESH_WORKER_* env)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from genmesh.core.models.store import ModelStore, default_store_root
from genmesh.v1 import worker_pb2, worker_pb2_grpc
from services.common.server import run_service, serve
from services.common.telemetry import settings_from, setup
from services.common.tls import MeshTls, redis_url
from services.worker.config import WorkerConfig
from services.worker.engine.api import create_engine
from services.worker.engine.config import EngineConfig
from services.worker.gpu import Nvml
from services.worker.metrics import WorkerMetrics
from services.worker.records import RecordSink
from services.worker.servicer import WorkerServicer
from services.worker.stream_interval import StreamInterval


def engine_config(cfg: WorkerConfig, model_path: str, draft_path: str | None = None
                  ) -> EngineConfig:
    return EngineConfig(model=model_path, backend=cfg.backend, dtype=cfg.dtype,
                        device=cfg.device, load_format=cfg.load_format,
                        kv_cache_memory_gib=cfg.kv_cache_gib, max_num_seqs=cfg.max_num_seqs,
                        num_threads=cfg.num_threads or None,
                        max_num_batched_tokens=cfg.max_num_batched_tokens,
                        quantization=cfg.quantization,
                        quant_group_size=(None if cfg.quant_group_size < 0
                                          else cfg.quant_group_size),
                        speculative=cfg.speculative,
                        num_speculative_tokens=cfg.num_speculative_tokens,
                        speculative_draft_model=draft_path,
                        speculative_draft_quantization=cfg.speculative_draft_quantization,
                        speculative_by_default=cfg.speculative_by_default)


async def run(cfg: WorkerConfig) -> None:
    # One trace service per model version, so a trace shows which version answered.
    telemetry = setup(settings_from(f"genmesh-worker-{cfg.model_version}", cfg))
    model_path = cfg.model
    draft_path = cfg.speculative_draft_model or None
    if cfg.load_format != "dummy":
        store = ModelStore(default_store_root())
        model_path = str(store.path_of(cfg.model))
        if draft_path is not None:
            draft_path = str(store.path_of(draft_path))
    core_exits: list[str] = []

    def core_exited(reason: str) -> None:
        # A worker without its engine serves nothing: drain and exit non-zero, so the
        # health check fails at once and a supervisor restarts the worker.
        core_exits.append(reason)
        os.kill(os.getpid(), signal.SIGTERM)

    engine = create_engine(engine_config(cfg, model_path, draft_path),
                           core_process=cfg.engine_process,
                           on_core_exit=core_exited)
    records = (RecordSink(redis_url(cfg, cfg.record_redis_url),
                          max_entries=cfg.record_max_entries)
               if cfg.record_redis_url else None)
    gpus = Nvml.open() if cfg.metrics_port and cfg.is_gpu else None
    metrics, refresher = None, None
    if cfg.metrics_port:
        metrics = WorkerMetrics(model=cfg.served_name, version=cfg.model_version,
                                price_per_device_hour=cfg.price_per_device_hour, gpus=gpus)
        refresher = asyncio.create_task(metrics.refresh_forever(engine))
    servicer = WorkerServicer(engine, model_name=cfg.served_name,
                              model_version=cfg.model_version, worker_id=cfg.address,
                              records=records, metrics=metrics,
                              stream_interval=StreamInterval(
                                  cfg.stream_interval, cfg.stream_replies_per_step,
                                  cfg.stream_interval_min_batch,
                                  cfg.stream_interval_max_hold_ms))

    async def stop_engine() -> None:
        if refresher is not None:
            refresher.cancel()
        engine.shutdown()
        if gpus is not None:
            gpus.close()
        if records is not None:
            await records.close()

    await serve(tls=MeshTls.of(cfg), health_port=cfg.health_port,
                name="genmesh.worker", address=cfg.address,
                register=lambda s: worker_pb2_grpc.add_WorkerServicer_to_server(servicer, s),
                service_names=[worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name],
                grace_s=cfg.shutdown_grace_s, on_stop=telemetry.flush_after(stop_engine),
                interceptors=telemetry.server_interceptors())
    if core_exits:
        raise SystemExit(f"genmesh-worker: {core_exits[0]}")


def main(argv: list[str] | None = None) -> int:
    return run_service(WorkerConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
