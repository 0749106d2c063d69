"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) over the paged KV cache.

Weights are plain tensors (no nn.Module machinery on the hot path); q/k/v and
gate/up projections are fused into one matmul each. Activations are one flat batch of
``T`` tokens from many sequences: ``[T, hidden]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.worker.engine.model.attention import (
    AttentionMetadata,
    DecodeKernel,
    paged_attention,
)
from services.worker.engine.model.config import ModelConfig
from services.worker.engine.model.ops import EXACT_MAX_ROWS, SKINNY_MAX_ROWS, pick_ops
from services.worker.engine.model.quant import QuantizedWeight, Weight


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor  # [d]
    qkv: Weight  # [(H + 2 Hkv) * D, d]; the matmul weights may be quantized (quant.py)
    qkv_bias: torch.Tensor | None  # [(H + 2 Hkv) * D] (Qwen2)
    o: Weight  # [d, H * D]
    post_norm: torch.Tensor  # [d]
    gate_up: Weight  # [2 I, d]
    down: Weight  # [d, I]


@dataclass(slots=True)
class ModelWeights:
    embed: torch.Tensor  # [V, d]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [d]
    lm_head: Weight  # [V, d]; the same tensor as embed when tied (and not quantized)

    def linear_weights(self) -> list[Weight]:
        """Every weight used as a matmul operand."""
        ws = [w for layer in self.layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        return [*ws, self.lm_head]

    def num_bytes_read_per_token(self) -> int:
        """Bytes of weights one decode step reads (the embedding row lookup excluded)."""
        total = _num_bytes(self.lm_head) + _num_bytes(self.final_norm)
        for layer in self.layers:
            for t in (layer.input_norm, layer.qkv, layer.qkv_bias, layer.o, layer.post_norm,
                      layer.gate_up, layer.down):
                if t is not None:
                    total += _num_bytes(t)
        return total


def _num_bytes(w: Weight) -> int:
    if isinstance(w, QuantizedWeight):
        return w.num_bytes()
    return w.numel() * w.element_size()


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [D/2] (fp32), with Llama 3 scaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if not s:
        return inv_freq
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryTable:
    """cos/sin for every position up to ``max_positions``: [P, D] each."""

    def __init__(self, cfg: ModelConfig, max_positions: int, *, device: torch.device,
                 dtype: torch.dtype) -> None:
        inv_freq = rope_inv_freq(cfg)
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)  # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
        self.cos = emb.cos().to(device=device, dtype=dtype)
        self.sin = emb.sin().to(device=device, dtype=dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for each token: [T, D] each."""
        return self.cos[positions], self.sin[positions]


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights, *, max_positions: int,
                 use_cpu_kernels: bool = True, use_triton: bool | None = None) -> None:
        self.cfg = cfg
        self.w = weights
        self.ops = pick_ops(linear_weights=weights.linear_weights(),
                            hidden_size=cfg.hidden_size, head_dim=cfg.head_dim,
                            intermediate_size=cfg.intermediate_size,
                            use_cpu_kernels=use_cpu_kernels, use_triton=use_triton)
        self.rope = RotaryTable(cfg, max_positions, device=weights.embed.device,
                                dtype=weights.embed.dtype)
        self.scale = cfg.head_dim ** -0.5
        layers = weights.layers
        # Per-kind weight lists for the one-call decode path (no per-step rebuilding);
        # quantized weights go as their integers, with their scales and offsets in
        # _qparams (8 a layer; the scales' shape gives the group size).
        def ints(w: Weight) -> torch.Tensor:
            return w.q if isinstance(w, QuantizedWeight) else w

        self._layer_lists = (
            [w.input_norm for w in layers], [ints(w.qkv) for w in layers],
            [ints(w.o) for w in layers], [w.post_norm for w in layers],
            [ints(w.gate_up) for w in layers], [ints(w.down) for w in layers],
        )
        quantized = [w for layer in layers for w in (layer.qkv, layer.o, layer.gate_up,
                                                     layer.down)
                     if isinstance(w, QuantizedWeight)]
        none = torch.empty(0)
        self._qparams = [t for w in quantized
                         for t in (w.scales, w.offsets if w.offsets is not None else none)]
        if quantized and len(quantized) != 4 * len(layers):
            raise ValueError("the one-call decode path needs every matmul quantized or none")

    @property
    def decode_attention(self) -> DecodeKernel | None:
        return self.ops.decode_attention

    def _can_decode_in_one_call(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        max_rows = EXACT_MAX_ROWS if meta.row_exact else SKINNY_MAX_ROWS
        return (self.ops.decode_layers is not None and num_tokens <= max_rows
                and not meta.has_prefills and len(meta.decode_groups) == 1
                and self.w.layers[0].qkv_bias is None)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                logits_indices: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T]. Returns fp32 logits [len(logits_indices), V]."""
        cfg, ops, layers = self.cfg, self.ops, self.w.layers
        eps = cfg.rms_norm_eps
        h_q, h_kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x = F.embedding(input_ids, self.w.embed)  # [T, d], the residual stream
        cos, sin = self.rope.lookup(positions)
        if self._can_decode_in_one_call(meta, x.shape[0]):
            g = meta.decode_groups[0]
            assert ops.decode_layers is not None
            h = ops.decode_layers(x, *self._layer_lists, self.w.final_norm,
                                  [k for k, _ in kv_caches], [v for _, v in kv_caches],
                                  cos, sin, meta.slot_mapping, g.block_table, g.ctx_lens,
                                  h_q, h_kv, d, eps, self.scale, self._qparams)
            head = ops.exact_linear if meta.row_exact and ops.exact_linear else ops.linear
            return head(h[logits_indices], self.w.lm_head).float()
        h = ops.rms_norm(x, layers[0].input_norm, eps)
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(layers, kv_caches, strict=True)):
            qkv = ops.linear(h, layer.qkv)  # [T, (H + 2 Hkv) D]
            if layer.qkv_bias is not None:
                qkv = qkv + layer.qkv_bias
            if ops.rope_write_kv is not None:
                q = ops.rope_write_kv(qkv, cos, sin, k_cache, v_cache, meta.slot_mapping,
                                      h_q, h_kv, d)  # [T, H, D]
                # k, v are in the cache already; the Triton kernels read them there.
                k = qkv[:, h_q * d:(h_q + h_kv) * d].view(-1, h_kv, d)
                v = qkv[:, (h_q + h_kv) * d:].view(-1, h_kv, d)
            else:
                qk = ops.rope(qkv, cos, sin, h_q + h_kv, d)  # [T, H + Hkv, D]
                q, k = qk[:, :h_q], qk[:, h_q:]
                v = qkv[:, (h_q + h_kv) * d:].view(-1, h_kv, d)
                ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
            attn = paged_attention(q, k, v, k_cache, v_cache, meta, scale=self.scale,
                                   decode_kernel=ops.decode_attention,
                                   prefill_kernel=ops.prefill_attention)
            x, h = ops.add_rms_norm(x, ops.linear(attn.view(attn.shape[0], -1), layer.o),
                                    layer.post_norm, eps)
            mlp = ops.linear(ops.silu_mul(ops.linear(h, layer.gate_up)), layer.down)
            next_norm = layers[i + 1].input_norm if i + 1 < len(layers) else self.w.final_norm
            x, h = ops.add_rms_norm(x, mlp, next_norm, eps)
        return ops.linear(h[logits_indices], self.w.lm_head).float()
