"""The only owner of tensors and the device: weights, the KV pool, and each step's inputs."""

from __future__ import annotations

from pathlib import Path

import torch

from services.worker.engine.config import EngineConfig
from services.worker.engine.model.attention import AttentionMetadata, DecodeGroup, PrefillChunk
from services.worker.engine.model.config import (
    PRESETS,
    ModelConfig,
    load_model_config,
    preset,
)
from services.worker.engine.model.llama import LlamaModel
from services.worker.engine.model.loader import dummy_weights, load_hf_weights
from services.worker.engine.scheduler import ScheduledChunk

MAX_DECODE_GROUPS = 4  # decode batches split by context length to bound padding
MIN_DECODE_GROUP = 8  # smallest group worth its own attention call


def resolve_model_config(config: EngineConfig) -> ModelConfig:
    if config.load_format == "dummy" and config.model in PRESETS:
        return preset(config.model)
    return load_model_config(Path(config.model))


def split_decode_groups(n: int, *, max_groups: int = MAX_DECODE_GROUPS) -> list[int]:
    """Sizes of the groups that ``n`` decodes, sorted by context length, are cut into."""
    num_groups = max(1, min(max_groups, n // MIN_DECODE_GROUP))
    base, extra = divmod(n, num_groups)
    return [base + (1 if i < extra else 0) for i in range(num_groups)]


class ModelRunner:
    def __init__(self, config: EngineConfig, model_cfg: ModelConfig, *, num_blocks: int,
                 max_model_len: int) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        self.model_cfg = model_cfg
        if config.load_format == "dummy":
            weights = dummy_weights(model_cfg, dtype=self.dtype, device=self.device,
                                    seed=config.seed)
        else:
            weights = load_hf_weights(Path(config.model), model_cfg, dtype=self.dtype,
                                      device=self.device)
        self.weight_bytes_per_token = weights.num_bytes_read_per_token()
        self.model = LlamaModel(model_cfg, weights, max_positions=max_model_len,
                                use_cpu_kernels=config.use_cpu_kernels)
        shape = (num_blocks, config.block_size, model_cfg.num_kv_heads, model_cfg.head_dim)
        # [num_layers] x (k, v), each [num_blocks, block_size, Hkv, D]
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device),
             torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(model_cfg.num_layers)
        ]

    def execute(self, chunks: list[ScheduledChunk], block_tables: list[list[int]]) -> torch.Tensor:
        """Run one step. Returns fp32 logits [S, V] for the chunks that complete their
        sequence, in the order they appear in ``chunks``."""
        bs = self.block_size
        decode_idx = [i for i, c in enumerate(chunks) if c.num_tokens == 1 and c.start > 0]
        decode_set = set(decode_idx)
        # Decodes first, sorted by context length so groups pad little; then prefills.
        decode_idx.sort(key=lambda i: chunks[i].start)
        order = decode_idx + [i for i in range(len(chunks)) if i not in decode_set]

        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        row_of_last_token: dict[int, int] = {}
        prefills: list[PrefillChunk] = []
        for i in order:
            c, table = chunks[i], block_tables[i]
            row = len(input_ids)
            end = c.start + c.num_tokens
            input_ids.extend(c.request.all_ids[c.start:end])
            positions.extend(range(c.start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(c.start, end))
            row_of_last_token[i] = len(input_ids) - 1
            if i not in decode_set:
                prefills.append(self._prefill_meta(row, c, table))

        decode_groups = []
        row = 0
        # A decode kernel reads blocks in place: no padding, so one group serves all.
        max_groups = 1 if self.model.decode_attention is not None else MAX_DECODE_GROUPS
        sizes = split_decode_groups(len(decode_idx), max_groups=max_groups) if decode_idx else []
        for size in sizes:
            members = decode_idx[row:row + size]
            decode_groups.append(self._decode_group(row, [chunks[i] for i in members],
                                                    [block_tables[i] for i in members]))
            row += size

        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True),
            decode_groups=decode_groups,
            prefills=prefills,
        )
        logits_rows = [row_of_last_token[i] for i, c in enumerate(chunks)
                       if c.completes_sequence]
        return self.model.forward(
            torch.tensor(input_ids, dtype=torch.int64).to(dev, non_blocking=True),
            torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True),
            meta,
            self.kv_caches,
            torch.tensor(logits_rows, dtype=torch.int64).to(dev, non_blocking=True),
        )

    def _decode_group(self, row: int, chunks: list[ScheduledChunk],
                      tables: list[list[int]]) -> DecodeGroup:
        ctx_lens = [c.start + 1 for c in chunks]
        max_blocks = -(-max(ctx_lens) // self.block_size)
        padded = [t[:max_blocks] + [0] * (max_blocks - len(t[:max_blocks])) for t in tables]
        lens = torch.tensor(ctx_lens, dtype=torch.int64)
        mask = None
        if self.model.decode_attention is None:
            span = torch.arange(max_blocks * self.block_size)
            mask = (span.unsqueeze(0) < lens.unsqueeze(1)).view(len(chunks), 1, 1, -1)
            mask = mask.to(self.device)
        return DecodeGroup(
            token_slice=slice(row, row + len(chunks)),
            block_table=torch.tensor(padded, dtype=torch.int64).to(self.device),
            ctx_lens=lens.to(self.device),
            mask=mask,
        )

    def _prefill_meta(self, row: int, c: ScheduledChunk, table: list[int]) -> PrefillChunk:
        token_slice = slice(row, row + c.num_tokens)
        if c.start == 0:
            return PrefillChunk(token_slice=token_slice, start=0, block_ids=None, mask=None)
        ctx = c.start + c.num_tokens
        num_blocks = -(-ctx // self.block_size)
        q_pos = torch.arange(c.start, ctx).unsqueeze(1)
        mask = torch.arange(ctx).unsqueeze(0) <= q_pos  # [n, ctx]
        return PrefillChunk(
            token_slice=token_slice,
            start=c.start,
            block_ids=torch.tensor(table[:num_blocks], dtype=torch.int64).to(self.device),
            mask=mask.to(self.device),
        )
