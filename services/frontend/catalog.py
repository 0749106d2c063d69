"""The models this frontend serves: name and version resolution, and the ListModels view
assembled from the tokenizer and the worker."""

from __future__ import annotations

import asyncio

import grpc

from genmesh.v1 import (
    generation_pb2,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from services.frontend.errors import PipelineError, rpc_error


class ModelCatalog:
    def __init__(self, *, model: str, versions: tuple[str, ...],
                 tokenizer: tokenizer_pb2_grpc.TokenizerStub,
                 worker: worker_pb2_grpc.WorkerStub, rpc_timeout_s: float) -> None:
        self.model = model
        self.versions = versions
        self.tokenizer = tokenizer
        self.worker = worker
        self.rpc_timeout_s = rpc_timeout_s

    def resolve(self, model: str, version: str) -> tuple[str, str]:
        """(model, version) with defaults filled in; NOT_FOUND for what is not served.
        An empty version stays empty: the gateway's rollout picks one."""
        name = model or self.model
        if name != self.model:
            raise PipelineError(grpc.StatusCode.NOT_FOUND,
                                f"model {name!r} is not served here; served: {self.model!r}")
        if version and version not in self.versions:
            raise PipelineError(grpc.StatusCode.NOT_FOUND,
                                f"model {name!r} has no version {version!r}; "
                                f"versions: {', '.join(self.versions)}")
        return name, version

    async def list_models(self) -> generation_pb2.ListModelsResponse:
        try:
            described, stats = await asyncio.gather(
                self.tokenizer.DescribeModel(tokenizer_pb2.DescribeModelRequest(
                    model=self.model), timeout=self.rpc_timeout_s),
                self.worker.GetStats(worker_pb2.GetStatsRequest(), timeout=self.rpc_timeout_s))
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, "model catalog") from None
        info = generation_pb2.ModelInfo(
            name=self.model, versions=self.versions, is_default=True,
            max_model_len=stats.max_model_len, has_chat_template=described.has_chat_template)
        return generation_pb2.ListModelsResponse(models=[info])
