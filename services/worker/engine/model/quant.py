"""Weight-only quantization of a model's linear layers: int8 per output channel, int4 in
groups along the input.

A quantized weight reads 1/2 (int8) or about 1/4 (int4) of bf16's bytes per decode
step, and single-stream decoding on a CPU is bound by those bytes. Activations stay
bf16: the CPU kernels (cpu_kernels.cpp: ``quantized_linear``, and the one-call decode
path) multiply by the integers exactly and apply the scales to the sums; elsewhere
(CUDA, fp32, no kernels) ``linear`` dequantizes and calls F.linear, correct but not fast.

Scales and offsets are fp16 (as GGUF's blocks hold them).

int8: ``w ≈ q * scale[n, g]``, q in [-127, 127], scale = max|w| / 127 over the row
(per channel, the default) or over each group of its input columns.
int4: ``w ≈ q * scale[n, g] + offset[n, g]``, q in [0, 15], per group of ``group_size``
input columns (asymmetric: the group's min and max map to 0 and 15). Packed two per
byte: in each 64 weights, byte i holds weight i (low nibble) and weight i + 32 (high),
the layout the kernel unpacks with the fewest vector ops (cpu_kernels.cpp).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from services.worker.engine.model.llama import ModelWeights

LM_HEAD_GROUP_SIZE = 32  # GGUF's Q8_0 block (SmolLM2's embedding)
DEFAULT_GROUP_SIZE = 32  # int4: GGUF's Q4 block; 64 lost a quarter of top-1 agreement
# int8: groups of 64 agreed with bf16's top-1 on 0.973 of positions, one scale per output
# channel on 0.968 (64 prompts x 128 tokens, SmolLM2-135M), for 2% more bytes.
INT8_DEFAULT_GROUP_SIZE = 64
PER_CHANNEL = 0  # as a group size: int8 with one scale per output channel


class Quantization(enum.StrEnum):
    NONE = "none"
    INT8 = "int8"
    INT4 = "int4"


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """A linear layer's weight [N, K] in int8 or int4 (see the module's docstring)."""

    q: torch.Tensor  # int8 [N, K], or uint8 [N, K / 2] holding two int4 each
    scales: torch.Tensor  # fp16 [N, K / group_size]
    offsets: torch.Tensor | None  # fp16 [N, K / group_size] (int4); None for int8
    group_size: int  # input columns per scale (K: one per output channel)
    dtype: torch.dtype  # what dequantize() and linear() produce

    @property
    def bits(self) -> int:
        return 4 if self.q.dtype == torch.uint8 else 8

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.q.shape
        return (n, k * 2) if self.bits == 4 else (n, k)

    @property
    def device(self) -> torch.device:
        return self.q.device

    def numel(self) -> int:
        n, k = self.shape
        return n * k

    def num_bytes(self) -> int:
        parts = [self.q, self.scales] + ([self.offsets] if self.offsets is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def dequantize(self) -> torch.Tensor:
        """The [N, K] weight this stands for, in ``dtype``."""
        q = (self.q if self.bits == 8 else unpack_int4(self.q)).float()  # [N, K]
        n, k = q.shape
        w = q.view(n, k // self.group_size, self.group_size) * self.scales.float()[..., None]
        if self.offsets is not None:
            w = w + self.offsets.float()[..., None]
        return w.view(n, k).to(self.dtype)


Weight = torch.Tensor | QuantizedWeight


@dataclass(frozen=True, slots=True)
class ShortlistHead:
    """An LM head read in two passes (the CPU decode path, ``llama.LlamaModel``): every
    logit from ``coarse`` (int4, half the int8 head's bytes), then each row's ``size``
    highest recomputed from ``exact`` (the int8 head) and put in their place.

    The head is a fifth of a small model's bytes, and an int4 head alone moved the top
    token too often (0.89 agreement with bf16, SmolLM2-135M); the exact pass gives back
    the int8 head's logit for every token that could be the top one or carry real
    probability. The tail keeps its int4 logits, held under the highest exact one (a
    shortlist is picked for high coarse logits, so its int4 errors lean high, and a
    tail token could otherwise outrank it): a greedy token is the int8 head's whenever
    that token is among the coarse pass's ``size`` highest. (Holding the tail under the
    lowest exact one instead took mass from it: mean KL against bf16 0.0042 -> 0.0052.)
    Each row's logits depend on that row alone (the coarse kernel is row-exact and the
    exact pass gathers rows of the int8 head), as speculative verification needs."""

    coarse: QuantizedWeight  # int4 [V, d]
    exact: QuantizedWeight  # int8 [V, d]
    size: int  # tokens recomputed per row

    def num_bytes(self) -> int:
        """Bytes a one-row step reads: the coarse head and ``size`` exact rows."""
        n, _ = self.exact.shape
        return self.coarse.num_bytes() + self.exact.num_bytes() * self.size // n

    def rows(self, ids: torch.Tensor) -> QuantizedWeight:
        """The exact head's rows ``ids``, as a weight of their own."""
        e = self.exact
        return QuantizedWeight(
            q=e.q.index_select(0, ids), scales=e.scales.index_select(0, ids),
            offsets=None if e.offsets is None else e.offsets.index_select(0, ids),
            group_size=e.group_size, dtype=e.dtype)


def can_shortlist(head: QuantizedWeight) -> bool:
    """Whether the head's width takes an int4 copy (whole 64-weight blocks)."""
    return head.shape[1] % 64 == 0


def shortlist_head(head: QuantizedWeight, size: int, *, group_size: int = DEFAULT_GROUP_SIZE,
                   source: torch.Tensor | None = None) -> ShortlistHead:
    """A ShortlistHead over the int8 ``head``, its coarse copy quantized from ``source``
    (the fp32 head, when there is one) or from the int8 head's own values."""
    if size < 1:
        raise ValueError(f"a head shortlist needs at least one token, got {size}")
    if not can_shortlist(head):
        raise ValueError(f"no int4 copy of a head {head.shape[1]} wide (int4 needs a "
                         f"multiple of 64)")
    base = source if source is not None else head.dequantize().float()
    coarse = replace(quantize_int4(base, group_size), dtype=head.dtype)
    return ShortlistHead(coarse=coarse, exact=head, size=min(size, head.shape[0]))


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    """Symmetric int8 (round to nearest): one scale per output row, or per group of
    ``group_size`` input columns."""
    n, k = w.shape
    g = group_size or k
    check_group_size(k, g)
    groups = w.float().view(n, k // g, g)
    scales = (groups.abs().amax(dim=2) / 127.0).clamp_min(1e-7).half()
    q = torch.round(groups / scales.float()[..., None]).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight(q=q.view(n, k).contiguous(), scales=scales.contiguous(),
                           offsets=None, group_size=g, dtype=w.dtype)


def quantize_int4(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedWeight:
    """Asymmetric int4 in groups of ``group_size`` input columns (round to nearest)."""
    n, k = w.shape
    check_group_size(k, group_size)
    if k % 64:
        raise ValueError(f"int4 needs an input width that is a multiple of 64, got {k}")
    if group_size != 32 and group_size % 64:
        raise ValueError(f"int4 groups are 32 or a multiple of 64 (whole 64-weight blocks, "
                         f"as the kernel unpacks them), got {group_size}")
    groups = w.float().view(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)
    scales = ((hi - lo) / 15.0).clamp_min(1e-7).half()
    offsets = lo.half()
    q = torch.round((groups - offsets.float()[..., None]) / scales.float()[..., None])
    q = q.clamp_(0, 15)
    return QuantizedWeight(q=pack_int4(q.view(n, k).to(torch.uint8)),
                           scales=scales.contiguous(), offsets=offsets.contiguous(),
                           group_size=group_size, dtype=w.dtype)


def check_group_size(k: int, group_size: int) -> None:
    if group_size < 32 or group_size % 32 or k % group_size:
        raise ValueError(f"the group size must be a multiple of 32 dividing the input "
                         f"width {k}, got {group_size}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of values 0..15 -> [N, K / 2]: in each 64, byte i = q[i] | q[i+32] << 4."""
    n, k = q.shape
    blocks = q.view(n, k // 64, 2, 32)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4."""
    n, half = packed.shape
    blocks = packed.view(n, half // 32, 32)
    return torch.stack([blocks & 0x0F, blocks >> 4], dim=2).reshape(n, half * 2)


def resolved_group(mode: Quantization, group_size: int | None) -> int | None:
    """The group size ``mode`` uses for ``group_size`` (None: the mode's default;
    PER_CHANNEL: int8 per output channel, returned as None)."""
    if mode is Quantization.INT4:
        if group_size == PER_CHANNEL:
            raise ValueError("int4 has no per-channel mode: give a group size")
        return group_size or DEFAULT_GROUP_SIZE
    if group_size is None:
        return INT8_DEFAULT_GROUP_SIZE
    return group_size or None


def quantize(w: Weight, mode: Quantization, group_size: int | None,
             dtype: torch.dtype | None = None) -> Weight:
    """``w`` in ``mode``, computing in ``dtype`` (None: w's own); a weight quantized
    already stays as it is. ``group_size``: see resolved_group."""
    if isinstance(w, QuantizedWeight):
        return w
    if mode is not Quantization.NONE:
        default = group_size is None
        group_size = resolved_group(mode, group_size)
        if default and mode is Quantization.INT8 and w.shape[1] % INT8_DEFAULT_GROUP_SIZE:
            group_size = None  # a width the default groups do not divide: per channel
    if mode is Quantization.INT8:
        qw = quantize_int8(w, group_size)
    elif mode is Quantization.INT4:
        qw = quantize_int4(w, group_size or DEFAULT_GROUP_SIZE)  # resolved: never 0
    else:
        return w if dtype is None else w.to(dtype)
    return qw if dtype is None else replace(qw, dtype=dtype)


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x @ w.T for any weight, without the CPU kernels (any device and dtype)."""
    if isinstance(w, QuantizedWeight):
        if (w.bits == 8 and w.group_size == w.shape[1] and x.device.type == "cpu"
                and x.dtype in (torch.bfloat16, torch.float32)):
            return torch._weight_int8pack_mm(x, w.q, w.scales.view(-1).to(x.dtype))
        return F.linear(x, w.dequantize().to(x.dtype))
    return F.linear(x, w)


def quantize_model(weights: ModelWeights, mode: Quantization, *, group_size: int | None,
                   lm_head: bool = False, head_shortlist: int = 0,
                   dtype: torch.dtype | None = None,
                   prebuilt: Mapping[str, QuantizedWeight] | None = None) -> ModelWeights:
    """``weights`` with every decoder layer's matmul weight (qkv, o, gate_up, down)
    quantized, and the LM head too when ``lm_head``, as int8 in groups of
    LM_HEAD_GROUP_SIZE (a tied one is copied: the embedding rows stay as they are), read
    through a ShortlistHead of ``head_shortlist`` exact tokens when that is not 0; every
    other tensor cast to ``dtype`` (None: as they are).
    Quantizing from fp32 weights rounds once, not twice (fp32 -> bf16 -> int).
    ``prebuilt`` (prebuilt.py: ``layers.<i>.<name>`` -> weight) replaces quantizing."""
    def q(w: Weight, key: str = "") -> Weight:
        if prebuilt is not None and key in prebuilt:
            built = prebuilt[key]
            return built if dtype is None else replace(built, dtype=dtype)
        return quantize(w, mode, group_size, dtype)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t if dtype is None else t.to(dtype)

    layers = [replace(layer, input_norm=cast(layer.input_norm),
                      qkv=q(layer.qkv, f"layers.{i}.qkv"),
                      qkv_bias=None if layer.qkv_bias is None else cast(layer.qkv_bias),
                      o=q(layer.o, f"layers.{i}.o"), post_norm=cast(layer.post_norm),
                      gate_up=q(layer.gate_up, f"layers.{i}.gate_up"),
                      down=q(layer.down, f"layers.{i}.down"))
              for i, layer in enumerate(weights.layers)]
    embed = cast(weights.embed)
    head: Weight | ShortlistHead
    source = weights.lm_head
    if lm_head and mode is not Quantization.NONE and not isinstance(source, ShortlistHead):
        built = prebuilt.get("lm_head") if prebuilt is not None else None
        exact: Weight
        if built is not None:
            exact = built if dtype is None else replace(built, dtype=dtype)
        else:  # int8 in groups whatever the layers' mode: the logits are the most sensitive
            exact = quantize(source, Quantization.INT8, LM_HEAD_GROUP_SIZE, dtype)
        head = exact
        if head_shortlist and isinstance(exact, QuantizedWeight) and can_shortlist(exact):
            head = shortlist_head(exact, head_shortlist, source=(
                source.float() if isinstance(source, torch.Tensor) else None))
    elif weights.lm_head is weights.embed:
        head = embed  # tied: one tensor
    elif isinstance(weights.lm_head, (QuantizedWeight, ShortlistHead)):
        head = weights.lm_head
    else:
        head = cast(weights.lm_head)
    return replace(weights, embed=embed, layers=layers, final_norm=cast(weights.final_norm),
                   lm_head=head)
