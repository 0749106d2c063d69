"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) over the paged KV cache.

Weights are plain tensors (no nn.Module machinery on the hot path); q/k/v and
gate/up projections are fused into one matmul each. Activations are one flat batch of
``T`` tokens from many sequences: ``[T, hidden]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.worker.engine.model import cpu_kernels
from services.worker.engine.model.attention import (
    AttentionMetadata,
    DecodeKernel,
    paged_attention,
)
from services.worker.engine.model.config import ModelConfig


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor  # [d]
    qkv: torch.Tensor  # [(H + 2 Hkv) * D, d]
    qkv_bias: torch.Tensor | None  # [(H + 2 Hkv) * D] (Qwen2)
    o: torch.Tensor  # [d, H * D]
    post_norm: torch.Tensor  # [d]
    gate_up: torch.Tensor  # [2 I, d]
    down: torch.Tensor  # [d, I]


@dataclass(slots=True)
class ModelWeights:
    embed: torch.Tensor  # [V, d]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [d]
    lm_head: torch.Tensor  # [V, d]; the same tensor as embed when tied

    def num_bytes_read_per_token(self) -> int:
        """Bytes of weights one decode step reads (the embedding row lookup excluded)."""
        total = self.lm_head.numel() * self.lm_head.element_size()
        total += self.final_norm.numel() * self.final_norm.element_size()
        for layer in self.layers:
            for t in (layer.input_norm, layer.qkv, layer.qkv_bias, layer.o, layer.post_norm,
                      layer.gate_up, layer.down):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total


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
        """cos, sin for each token: [T, 1, D] each (broadcast over heads)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D] rotated by each token's position (half-split layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, as the reference implementation does."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, eps)
    return weight * normed.to(x.dtype)


Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SKINNY_MAX_ROWS = 2  # up to this many rows the bf16 CPU kernel beats oneDNN (measured)


def pick_linear(weights: ModelWeights, *, use_cpu_kernels: bool) -> Linear:
    """F.linear, or for bf16 on AVX512-BF16 CPUs a kernel that streams the weights at
    memory bandwidth when only a few rows (decode steps) are multiplied."""
    w = weights.embed
    if not (use_cpu_kernels and w.device.type == "cpu" and w.dtype == torch.bfloat16):
        return F.linear
    kernels = cpu_kernels.load()
    if kernels is None:
        return F.linear
    skinny = kernels.skinny_linear_bf16

    def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return skinny(x, weight) if x.shape[0] <= SKINNY_MAX_ROWS else F.linear(x, weight)

    return linear


def pick_decode_attention(weights: ModelWeights, cfg: ModelConfig, *,
                          use_cpu_kernels: bool) -> DecodeKernel | None:
    """The compiled paged decode-attention kernel where it applies, else None (SDPA)."""
    w = weights.embed
    if not (use_cpu_kernels and w.device.type == "cpu" and w.dtype == torch.bfloat16
            and cfg.head_dim % 32 == 0 and cfg.head_dim <= 256):
        return None
    kernels = cpu_kernels.load()
    return kernels.paged_decode_attention_bf16 if kernels is not None else None


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights, *, max_positions: int,
                 use_cpu_kernels: bool = True) -> None:
        self.cfg = cfg
        self.w = weights
        self.linear = pick_linear(weights, use_cpu_kernels=use_cpu_kernels)
        self.decode_attention = pick_decode_attention(weights, cfg,
                                                      use_cpu_kernels=use_cpu_kernels)
        self.rope = RotaryTable(cfg, max_positions, device=weights.embed.device,
                                dtype=weights.embed.dtype)
        self.scale = cfg.head_dim ** -0.5
        h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self._split = ((h + hkv) * d, hkv * d)  # [q | k] get rotated together, then v

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                logits_indices: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T]. Returns fp32 logits [len(logits_indices), V]."""
        cfg, linear = self.cfg, self.linear
        eps = cfg.rms_norm_eps
        h_q, h_kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x = F.embedding(input_ids, self.w.embed)  # [T, d]
        cos, sin = self.rope.lookup(positions)
        for layer, (k_cache, v_cache) in zip(self.w.layers, kv_caches, strict=True):
            h = rms_norm(x, layer.input_norm, eps)
            qkv = linear(h, layer.qkv)  # [T, (H + 2 Hkv) D]
            if layer.qkv_bias is not None:
                qkv = qkv + layer.qkv_bias
            qk, v = qkv.split(self._split, dim=-1)
            qk = apply_rope(qk.view(-1, h_q + h_kv, d), cos, sin)  # [T, H + Hkv, D]
            q, k = qk[:, :h_q], qk[:, h_q:]
            v = v.view(-1, h_kv, d)
            attn = paged_attention(q, k, v, k_cache, v_cache, meta, scale=self.scale,
                                   decode_kernel=self.decode_attention)
            x = x + linear(attn.view(attn.shape[0], -1), layer.o)
            h = rms_norm(x, layer.post_norm, eps)
            gate, up = linear(h, layer.gate_up).chunk(2, dim=-1)  # [T, I] each
            x = x + linear(F.silu(gate) * up, layer.down)
        x = rms_norm(x[logits_indices], self.w.final_norm, eps)
        return linear(x, self.w.lm_head).float()
