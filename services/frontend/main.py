"""Entry point: ``python -m services.frontend.main [--flags]`` (or GENMESH_FRONTEND_* env)."""

from __future__ import annotations

import asyncio
import os
import sys

import grpc

from genmesh.v1 import generation_pb2, generation_pb2_grpc, tokenizer_pb2_grpc, worker_pb2_grpc
from services.common.server import serve, setup_json_logging
from services.frontend.catalog import ModelCatalog
from services.frontend.config import FrontendConfig, load_config
from services.frontend.pipeline import Pipeline
from services.frontend.servicer import GenerationServicer


async def run(cfg: FrontendConfig) -> None:
    tokenizer_channel = grpc.aio.insecure_channel(cfg.tokenizer_address)
    worker_channel = grpc.aio.insecure_channel(cfg.worker_address)
    tokenizer = tokenizer_pb2_grpc.TokenizerStub(tokenizer_channel)
    worker = worker_pb2_grpc.WorkerStub(worker_channel)
    pipeline = Pipeline(tokenizer=tokenizer, worker=worker, rpc_timeout_s=cfg.rpc_timeout_s)
    catalog = ModelCatalog(model=cfg.model, versions=cfg.versions, tokenizer=tokenizer,
                           worker=worker, rpc_timeout_s=cfg.rpc_timeout_s)
    servicer = GenerationServicer(pipeline=pipeline, catalog=catalog,
                                  max_generation_s=cfg.max_generation_s,
                                  max_session_turns=cfg.max_session_turns)

    async def close_channels() -> None:
        await tokenizer_channel.close()
        await worker_channel.close()

    await serve(name="genmesh.frontend", address=cfg.address,
                register=lambda s: generation_pb2_grpc.add_GenerationServicer_to_server(
                    servicer, s),
                service_names=[generation_pb2.DESCRIPTOR.services_by_name["Generation"]
                               .full_name],
                grace_s=cfg.shutdown_grace_s, on_stop=close_channels)


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(argv, os.environ)
    setup_json_logging("genmesh.frontend", cfg.log_level)
    asyncio.run(run(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
