"""KV pool size and context cap, shared by every engine backend."""

from __future__ import annotations

from services.worker.engine.config import EngineConfig
from services.worker.engine.model.config import ModelConfig


def num_kv_blocks(config: EngineConfig, cfg: ModelConfig,
                  draft: ModelConfig | None = None) -> int:
    """``config.num_kv_blocks``, or as many blocks as ``kv_cache_memory_gib`` holds. With
    a ``draft`` model, whose KV has a slot for each of the model's (draft_model.py),
    a block costs both, so the two together stay within the memory."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    elements = cfg.kv_bytes_per_token_per_element
    if draft is not None:
        elements += draft.kv_bytes_per_token_per_element
    per_block = elements * config.block_size * config.torch_dtype.itemsize
    return max(1, int(config.kv_cache_memory_gib * 2**30 // per_block))


def max_model_len(config: EngineConfig, cfg: ModelConfig, num_blocks: int) -> int:
    """The longest sequence (prompt + output) served: the model's positions, Mistral's
    sliding window, the configured cap, and what the pool holds on its own (a sequence
    that cannot fit the whole pool could never finish, preemption or not)."""
    limit = min(cfg.max_position_embeddings, num_blocks * config.block_size)
    for cap in (cfg.sliding_window, config.max_model_len):
        if cap:
            limit = min(limit, cap)
    return limit
