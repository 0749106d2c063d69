"""The tensor ops of a decoder layer, in two interchangeable sets: plain PyTorch (any
device and dtype) and fused AVX512-BF16 CPU kernels (bf16 on CPU). Both compute the
same function; the fused set exists because at decode batch sizes the dispatch cost
of many small PyTorch ops, not arithmetic, dominates a step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from types import ModuleType

import torch
import torch.nn.functional as F

from services.worker.engine.model import cpu_kernels, quant
from services.worker.engine.model.attention import DecodeKernel, PrefillKernel, write_kv
from services.worker.engine.model.quant import QuantizedWeight, Weight

Tensor = torch.Tensor
SKINNY_MAX_ROWS = 2  # up to this many rows the bf16 CPU kernel beats oneDNN (measured)
# Speculative verification steps up to this many rows take the row-exact decode kernels
# (each row computed as a one-row call computes it); larger ones the batched path.
EXACT_MAX_ROWS = 40
PACK_HINT_ROWS = 512  # oneDNN's packing hint; 1..512 rows all run well with it (measured)


def padded_rows(rows: int) -> int:
    """The row count oneDNN runs ``rows`` at: a multiple of 8 up to 64, of 32 beyond.
    oneDNN builds (JIT) and caches a primitive per input shape, up to 1024 of them; with
    every token count of a step its own shape, a worker's memory grew by ~0.5 MB a
    request until that cache was full (+35% in a soak) and steps paid for new builds.
    These buckets are ~22 shapes a weight; the padded rows cost little next to reading
    the weights (~6% more arithmetic at 256 rows)."""
    step = 8 if rows <= 64 else 32
    return -(-rows // step) * step


@dataclass(frozen=True, slots=True)
class LayerOps:
    # (x [T, in], w [out, in], maybe quantized) -> [T, out]
    linear: Callable[[Tensor, Weight], Tensor]
    rms_norm: Callable[[Tensor, Tensor, float], Tensor]  # (x, weight, eps)
    # (x, delta, weight, eps) -> (x + delta, rms_norm(x + delta)); may update x in place
    add_rms_norm: Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]
    # (qkv [T, *], cos [T, D], sin [T, D], num_heads, head_dim) -> the first num_heads
    # heads of each row rotated, [T, num_heads, D]; may rotate qkv in place
    rope: Callable[[Tensor, Tensor, Tensor, int, int], Tensor]
    silu_mul: Callable[[Tensor], Tensor]  # [T, 2I] -> silu(gate) * up, [T, I]
    # (k, v [T, Hkv, D], k_cache, v_cache, slot_mapping [T]) -> None: store into slots
    write_kv: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], None]
    decode_attention: DecodeKernel | None  # None: SDPA over gathered blocks
    # Every layer of a pure-decode step of at most SKINNY_MAX_ROWS tokens in one call
    # (cpu_kernels.cpp: decode_layers_bf16); None: the Python layer loop.
    decode_layers: Callable[..., Tensor] | None = None
    # All prefill chunks of a step in one varlen call reading the cache in place
    # (attention.PrefillKernel); None: one SDPA call per chunk over gathered blocks.
    prefill_attention: PrefillKernel | None = None
    # (qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim)
    # -> q [T, H, D]: rope and write_kv in one kernel (slots of -1 are skipped); None:
    # rope, then write_kv.
    rope_write_kv: Callable[..., Tensor] | None = None
    # (x [T, in], w) -> [T, out] with each row exactly what a one-row call gives (the
    # decode kernels, any number of rows); None where ``linear`` has no such guarantee.
    exact_linear: Callable[[Tensor, Weight], Tensor] | None = None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm computed in fp32, as the reference implementation does."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, eps)
    return weight * normed.to(x.dtype)


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    x = x + delta
    return x, rms_norm(x, weight, eps)


def rope(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, head_dim: int) -> Tensor:
    x = qkv[:, : num_heads * head_dim].view(-1, num_heads, head_dim)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    half = head_dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def silu_mul(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


TORCH_OPS = LayerOps(linear=quant.linear, rms_norm=rms_norm, add_rms_norm=add_rms_norm,
                     rope=rope, silu_mul=silu_mul, write_kv=write_kv, decode_attention=None)


def _exact_linear(k: ModuleType) -> Callable[[Tensor, Weight], Tensor]:
    """The decode kernels for any number of rows, each row as a one-row call computes
    it (their per-row arithmetic does not depend on the other rows)."""
    none = torch.empty(0)

    def linear(x: Tensor, weight: Weight) -> Tensor:
        if isinstance(weight, QuantizedWeight):
            offsets = weight.offsets if weight.offsets is not None else none
            return k.quantized_linear(x, weight.q, weight.scales, offsets)
        return k.skinny_linear_bf16(x, weight)

    return linear


def _packed_linear(k: ModuleType, weights: list[Weight]) -> Callable[[Tensor, Weight], Tensor]:
    """bf16 linear for the CPU: the skinny kernel for decode-sized inputs, else oneDNN
    on weights packed once into its blocked layout (~30% faster than F.linear, which
    re-packs per call; measured for 4-256 rows). Costs a second copy of the weights.

    Quantized weights: the quantized kernel for decode-sized inputs (bound by the bytes
    read, which quantization cuts), else oneDNN on a packed bf16 copy of the dequantized
    weight (more rows are bound by arithmetic, where oneDNN's blocking beat a kernel
    that dequantized a tile of rows at a time: 64 streams ran at 0.87x bf16's
    throughput on it). That copy is the second copy the bf16 path keeps too."""
    exact = _exact_linear(k)
    packed = {id(w): torch.ops.mkldnn._reorder_linear_weight(
        w.dequantize() if isinstance(w, QuantizedWeight) else w, PACK_HINT_ROWS)
        for w in weights}

    def linear(x: Tensor, weight: Weight) -> Tensor:
        rows = x.shape[0]
        if rows <= SKINNY_MAX_ROWS:
            return exact(x, weight)
        if (padded := padded_rows(rows)) != rows:
            x = F.pad(x, (0, 0, 0, padded - rows))
        out = torch.ops.mkldnn._linear_pointwise(x, packed[id(weight)], None, "none", [], "")
        return out[:rows]

    return linear


def _cpu_bf16_ops(k: ModuleType, *, weights: list[Weight], hidden_size: int, head_dim: int,
                  intermediate_size: int) -> LayerOps:
    linear = _packed_linear(k, weights)

    def fused_add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor,
                           eps: float) -> tuple[Tensor, Tensor]:
        return x, k.add_rms_norm_bf16(x, delta, weight, eps)

    def fused_rope(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int,
                   head_dim: int) -> Tensor:
        k.rope_bf16_(qkv, cos, sin, num_heads, head_dim)
        return qkv[:, : num_heads * head_dim].view(-1, num_heads, head_dim)

    # The fused kernels work in 16/32-wide vectors; other shapes keep the torch op.
    return LayerOps(
        linear=linear,
        rms_norm=k.rms_norm_bf16 if hidden_size % 16 == 0 else rms_norm,
        add_rms_norm=fused_add_rms_norm if hidden_size % 16 == 0 else add_rms_norm,
        rope=fused_rope if head_dim % 32 == 0 else rope,
        silu_mul=k.silu_mul_bf16 if intermediate_size % 16 == 0 else silu_mul,
        write_kv=k.write_kv_bf16,
        decode_attention=k.paged_decode_attention_bf16
        if head_dim % 32 == 0 and head_dim <= 256 else None,
        decode_layers=k.decode_layers_bf16
        if hidden_size % 16 == 0 and head_dim % 32 == 0 and head_dim <= 256
        and intermediate_size % 32 == 0 else None,
        exact_linear=_exact_linear(k),
    )


def triton_ops() -> LayerOps:
    """Triton kernels for everything but the matmuls: paged attention that reads the
    cache in place (decode with split-K, varlen prefill) and the fused small ops. Made
    for CUDA; on the CPU they run only under TRITON_INTERPRET=1 (tests)."""
    from services.worker.engine.model import triton_attention, triton_ops

    return triton_ops.make_layer_ops(replace(
        TORCH_OPS,
        decode_attention=triton_attention.paged_decode_attention,
        prefill_attention=triton_attention.paged_prefill_attention,
    ))


def has_triton() -> bool:
    from services.worker.engine.model import triton_attention, triton_ops

    return triton_attention.HAS_TRITON and triton_ops.HAS_TRITON


def uses_cpu_kernels(*, device: torch.device, dtype: torch.dtype, use_cpu_kernels: bool,
                     use_triton: bool | None) -> bool:
    """Whether pick_ops picks the fused CPU set for weights on ``device`` in ``dtype``."""
    return (not use_triton and use_cpu_kernels and device.type == "cpu"
            and dtype == torch.bfloat16 and cpu_kernels.load() is not None)


def pick_ops(*, linear_weights: list[Weight], hidden_size: int, head_dim: int,
             intermediate_size: int, use_cpu_kernels: bool,
             use_triton: bool | None = None) -> LayerOps:
    """The Triton set on CUDA (``use_triton`` None: where triton imports; True: also on
    the CPU, for tests under TRITON_INTERPRET=1); the fused CPU set for bf16 on the CPU
    where the kernels build; else TORCH_OPS. ``linear_weights`` are every weight
    ``linear`` will be called with."""
    w = linear_weights[0]
    if use_triton or (use_triton is None and w.device.type == "cuda" and has_triton()):
        return triton_ops()
    if uses_cpu_kernels(device=w.device, dtype=w.dtype, use_cpu_kernels=use_cpu_kernels,
                        use_triton=use_triton):
        k = cpu_kernels.load()
        assert k is not None  # uses_cpu_kernels loaded it
        return _cpu_bf16_ops(k, weights=linear_weights, hidden_size=hidden_size,
                             head_dim=head_dim, intermediate_size=intermediate_size)
    return TORCH_OPS
