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
from services.worker.engine.model.quant import QuantizedWeight, ShortlistHead, Weight


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
    # [V, d]; the same tensor as embed when tied (and not quantized); quantized, maybe
    # read in two passes (quant.ShortlistHead)
    lm_head: Weight | ShortlistHead

    def linear_weights(self) -> list[Weight]:
        """Every weight used as a matmul operand of any size (a ShortlistHead's exact
        head; its coarse one only meets the decode kernels)."""
        ws = [w for layer in self.layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        head = self.lm_head
        return [*ws, head.exact if isinstance(head, ShortlistHead) else head]

    def num_bytes_read_per_token(self) -> int:
        """Bytes of weights one decode step reads (the embedding row lookup excluded)."""
        total = _num_bytes(self.lm_head) + _num_bytes(self.final_norm)
        for layer in self.layers:
            for t in (layer.input_norm, layer.qkv, layer.qkv_bias, layer.o, layer.post_norm,
                      layer.gate_up, layer.down):
                if t is not None:
                    total += _num_bytes(t)
        return total


def _num_bytes(w: Weight | ShortlistHead) -> int:
    if isinstance(w, (QuantizedWeight, ShortlistHead)):
        return w.num_bytes()
    return w.numel() * w.element_size()


_NEG_INF = torch.tensor(-math.inf)  # nextafter's direction (ShortlistHeads are on the CPU)


def top_indices(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The indices [R, k] of each row's k highest of ``logits`` [R, V], in no order:
    through the maxima of blocks of 64 first, a third of topk's time over a vocabulary.
    (A block holding one of the k highest has a maximum at least the k-th highest, and
    at most k blocks have, so the k blocks of highest maxima hold them all; with ties,
    some k highest.)"""
    r, v = logits.shape
    if v % 64 or v // 64 <= k:
        return logits.topk(k, dim=1, sorted=False).indices
    blocks = logits.view(r, v // 64, 64)
    best = blocks.amax(dim=2).topk(k, dim=1, sorted=False).indices  # [R, k] blocks
    candidates = blocks.gather(1, best.unsqueeze(2).expand(r, k, 64)).view(r, k * 64)
    pick = candidates.topk(k, dim=1, sorted=False).indices  # [R, k] of the candidates
    return best.gather(1, pick // 64) * 64 + pick % 64


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
            return self._logits(h[logits_indices], row_exact=meta.row_exact)
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
        return self._logits(h[logits_indices], row_exact=False)

    def _logits(self, h: torch.Tensor, *, row_exact: bool) -> torch.Tensor:
        """fp32 logits [R, V] of the final hidden states ``h`` [R, d]. A ShortlistHead
        takes its two passes where the decode kernels run (rows a decode step or a
        verification computes one by one); more rows, which arithmetic bounds, and other
        devices read its exact head."""
        ops, head = self.ops, self.w.lm_head
        exact = ops.exact_linear if row_exact and ops.exact_linear else None
        if not isinstance(head, ShortlistHead):
            return (exact or ops.linear)(h, head).float()
        if ops.exact_linear is None or not (row_exact or h.shape[0] <= SKINNY_MAX_ROWS):
            return ops.linear(h, head.exact).float()
        logits = ops.exact_linear(h, head.coarse).float()
        ids = top_indices(logits, head.size)  # [R, size]
        if h.shape[0] == 1:
            rows, where = ids[0], None
        else:  # one call over the rows the batch shortlisted, each row's picked out
            rows, where = torch.unique(ids, return_inverse=True)
        found = ops.exact_linear(h, head.rows(rows)).float()  # [R, len(rows)]
        if where is not None:
            found = found.gather(1, where)  # [R, size]: each row's own
        # The tail under the row's highest exact logit (ShortlistHead), then the exact ones.
        ceiling = torch.nextafter(found.amax(dim=1, keepdim=True), _NEG_INF)
        torch.minimum(logits, ceiling, out=logits)
        logits.scatter_(1, ids, found)
        return logits
