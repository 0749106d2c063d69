"""The only owner of tensors and the device: weights, the KV pool, and each step's inputs."""

from __future__ import annotations

from pathlib import Path

import torch

from services.worker.engine.config import EngineConfig
from services.worker.engine.input_batch import InputBatch, PendingTokens, StepInputs
from services.worker.engine.model import prebuilt
from services.worker.engine.model.attention import AttentionMetadata
from services.worker.engine.model.config import (
    PRESETS,
    ModelConfig,
    load_model_config,
    preset,
)
from services.worker.engine.model.cuda_graphs import DecodeGraphs, GraphStats
from services.worker.engine.model.llama import LlamaModel
from services.worker.engine.model.loader import dummy_weights, load_hf_weights
from services.worker.engine.model.ops import uses_cpu_kernels
from services.worker.engine.model.quant import Quantization, quantize_model
from services.worker.engine.scheduler import ScheduledChunk


def resolve_model_config(config: EngineConfig) -> ModelConfig:
    if config.load_format == "dummy" and config.model in PRESETS:
        return preset(config.model)
    return load_model_config(Path(config.model))


class ModelRunner:
    def __init__(self, config: EngineConfig, model_cfg: ModelConfig, *, num_blocks: int,
                 max_model_len: int) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        self.model_cfg = model_cfg
        quantization = Quantization(config.quantization)
        built = None  # the quantized layers `genmesh models pull --quant` built, if any
        if quantization is not Quantization.NONE and config.load_format != "dummy":
            built = prebuilt.load(Path(config.model), model_cfg, quantization,
                                  config.quant_group_size, dtype=self.dtype, device=self.device)
        # Weights quantized here are made from the checkpoint's fp32 (one rounding, not two).
        load_dtype = (torch.float32 if quantization is not Quantization.NONE and built is None
                      else self.dtype)
        if config.load_format == "dummy":
            weights = dummy_weights(model_cfg, dtype=load_dtype, device=self.device,
                                    seed=config.seed)
        else:
            weights = load_hf_weights(Path(config.model), model_cfg, dtype=load_dtype,
                                      device=self.device)
        # The LM head's two passes run on the decode kernels (quant.ShortlistHead).
        two_pass_head = uses_cpu_kernels(device=self.device, dtype=self.dtype,
                                         use_cpu_kernels=config.use_cpu_kernels,
                                         use_triton=config.use_triton)
        if quantization is not Quantization.NONE:
            weights = quantize_model(weights, quantization, group_size=config.quant_group_size,
                                     lm_head=config.quantize_lm_head,
                                     head_shortlist=(config.lm_head_shortlist
                                                     if two_pass_head else 0),
                                     dtype=self.dtype,
                                     prebuilt=built)
        self.weight_bytes_per_token = weights.num_bytes_read_per_token()
        self.model = LlamaModel(model_cfg, weights, max_positions=max_model_len,
                                use_cpu_kernels=config.use_cpu_kernels,
                                use_triton=config.use_triton)
        shape = (num_blocks, config.block_size, model_cfg.num_kv_heads, model_cfg.head_dim)
        # [num_layers] x (k, v), each [num_blocks, block_size, Hkv, D]
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device),
             torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(model_cfg.num_layers)
        ]
        ops = self.model.ops
        max_blocks_per_seq = -(-max_model_len // config.block_size)
        self.batch = InputBatch(max_num_seqs=config.max_num_seqs,
                                max_blocks_per_seq=max_blocks_per_seq,
                                max_num_tokens=config.max_num_batched_tokens,
                                block_size=config.block_size, device=self.device,
                                decode_kernel=ops.decode_attention is not None,
                                varlen_prefill=ops.prefill_attention is not None)
        self.graphs: DecodeGraphs | None = None
        use_graphs = config.cuda_graphs
        if use_graphs is None:
            use_graphs = self.device.type == "cuda" and ops.rope_write_kv is not None
        if use_graphs:
            if ops.decode_attention is None or ops.rope_write_kv is None:
                raise ValueError("cuda_graphs needs the Triton kernels (use_triton)")
            self.graphs = DecodeGraphs(
                self._forward, device=self.device, max_blocks_per_seq=max_blocks_per_seq,
                max_batch_size=min(config.cuda_graph_max_batch_size, config.max_num_seqs),
                capture=self.device.type == "cuda")
            self.graphs.capture()

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata, logits_indices: torch.Tensor) -> torch.Tensor:
        return self.model.forward(input_ids, positions, meta, self.kv_caches, logits_indices)

    def release(self, request_id: str) -> None:
        """A request finished or was preempted: its blocks are no longer its own."""
        self.batch.release(request_id)

    def prepare(self, chunks: list[ScheduledChunk], block_tables: list[list[int]],
                pending: PendingTokens | None = None, *,
                verify_drafts: bool = True, split_short: int = 0) -> StepInputs:
        return self.batch.prepare(chunks, block_tables, pending, verify_drafts=verify_drafts,
                                  split_short=split_short)

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Fp32 logits [S, V] for the chunks that complete their sequence, in the order
        they were scheduled."""
        if self.graphs is not None and self.graphs.can_run(inputs):
            return self.graphs.run(inputs)
        return self._forward(inputs.input_ids, inputs.positions, inputs.meta,
                             inputs.logits_indices)

    def execute(self, chunks: list[ScheduledChunk], block_tables: list[list[int]]
                ) -> torch.Tensor:
        """Run one step: ``prepare`` then ``run``."""
        return self.run(self.prepare(chunks, block_tables))

    def graph_stats(self) -> GraphStats | None:
        return self.graphs.stats() if self.graphs is not None else None
