"""Quantized decoder layers built once into the model's folder
(``genmesh models pull --quant``) and loaded instead of quantizing at every start.

``quant-<mode>-g<group>[-<int4 layout>].safetensors`` holds, for each layer i and each fused matmul
(qkv, o, gate_up, down), ``layers.<i>.<name>.q``, ``.scales`` and (int4) ``.offsets`` in
quant.py's layout, and ``lm_head.q``/``.scales`` (int8 in groups of 32; from GGUF's Q8_0
blocks as they are when the GGUF holds the head so).

For a model converted from a GGUF whose layer matmuls are Q4_1, int4 in groups of 32
is taken straight from the GGUF's blocks: Q4_1 is our int4 format (``w = q * d + m``
per 32 weights; its nibbles are repacked by 64, quant.py), so the int4 model computes
exactly the GGUF's weights, where re-quantizing the dequantized fp32 would round them
again. Other models, modes and group sizes quantize the fp32 checkpoint.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from services.worker.engine.model.config import ModelConfig
from services.worker.engine.model.quant import (
    LM_HEAD_GROUP_SIZE,
    Quantization,
    QuantizedWeight,
    pack_int4,
    quantize,
    quantize_int8,
    resolved_group,
)

MATMULS = ("qkv", "o", "gate_up", "down")
# Each fused matmul's parts: (HF tensor suffix, GGUF tensor suffix), in row order.
_PARTS = {
    "qkv": (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v")),
    "o": (("self_attn.o_proj", "attn_output"),),
    "gate_up": (("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up")),
    "down": (("mlp.down_proj", "ffn_down"),),
}
Q4_1_BLOCK = 32


# The int4 packing's version in the file name: a build in an older layout is not read.
INT4_LAYOUT = "n64"


def file_name(mode: Quantization, group_size: int | None) -> str:
    layout = f"-{INT4_LAYOUT}" if mode is Quantization.INT4 else ""
    return f"quant-{mode.value}-g{group_size or 'channel'}{layout}.safetensors"


def build(folder: Path, cfg: ModelConfig, mode: Quantization,
          group_size: int | None = None) -> tuple[Path, str]:
    """Write the quantized layers into ``folder``; returns the file and where its
    weights came from ("gguf" or "fp32")."""
    group = resolved_group(mode, group_size)
    gguf = _gguf_file(folder)
    tensors: dict[str, torch.Tensor] = {}
    source = "fp32"
    if mode is Quantization.INT4 and group == Q4_1_BLOCK and gguf is not None:
        blocks = gguf_q4_1_layers(gguf, cfg)
        if blocks is not None:
            source = "gguf"
            for key, w in blocks.items():
                _put(tensors, key, w)
    if source == "fp32":
        for i in range(cfg.num_layers):
            for name in MATMULS:
                built = quantize(_fp32_matmul(folder, i, name), mode, group_size)
                assert isinstance(built, QuantizedWeight)
                _put(tensors, f"layers.{i}.{name}", built)
    # The LM head: int8 in groups of 32 (quant.quantize_model), from GGUF's Q8_0 blocks
    # as they are when the GGUF holds it so.
    head = gguf_q8_0_head(gguf, cfg) if gguf is not None else None
    if head is None:
        head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        head = quantize_int8(_fp32_tensor(folder, head_name), LM_HEAD_GROUP_SIZE)
    _put(tensors, "lm_head", head)
    out = folder / file_name(mode, group)
    tmp = out.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"source": source})
    tmp.rename(out)
    return out, source


def load(folder: Path, cfg: ModelConfig, mode: Quantization, group_size: int | None, *,
         dtype: torch.dtype, device: torch.device
         ) -> dict[str, QuantizedWeight] | None:
    """``layers.<i>.<name>`` -> its quantized weight, from a prebuilt file; None when
    the folder has none for this mode and group size."""
    group = resolved_group(mode, group_size)
    path = folder / file_name(mode, group)
    if not path.exists():
        return None
    out: dict[str, QuantizedWeight] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        names = set(f.keys())
        for i in range(cfg.num_layers):
            for name in MATMULS:
                key = f"layers.{i}.{name}"
                q = f.get_tensor(f"{key}.q")
                offsets = f.get_tensor(f"{key}.offsets") if f"{key}.offsets" in names else None
                k = q.shape[1] * (2 if q.dtype == torch.uint8 else 1)
                scales = f.get_tensor(f"{key}.scales")
                out[key] = QuantizedWeight(q=q, scales=scales, offsets=offsets,
                                           group_size=k // scales.shape[1], dtype=dtype)
        if "lm_head.q" in names:
            q, scales = f.get_tensor("lm_head.q"), f.get_tensor("lm_head.scales")
            out["lm_head"] = QuantizedWeight(q=q, scales=scales, offsets=None,
                                             group_size=q.shape[1] // scales.shape[1],
                                             dtype=dtype)
    return out


def _put(tensors: dict[str, torch.Tensor], key: str, w: QuantizedWeight) -> None:
    tensors[f"{key}.q"] = w.q.contiguous()
    tensors[f"{key}.scales"] = w.scales.contiguous()
    if w.offsets is not None:
        tensors[f"{key}.offsets"] = w.offsets.contiguous()


def _fp32_matmul(folder: Path, layer: int, name: str) -> torch.Tensor:
    return torch.cat([_fp32_tensor(folder, f"model.layers.{layer}.{hf}.weight")
                      for hf, _ in _PARTS[name]])


def _fp32_tensor(folder: Path, tensor: str) -> torch.Tensor:
    for shard in sorted(folder.glob("*.safetensors")):
        if shard.name.startswith("quant-"):
            continue
        with safe_open(str(shard), framework="pt") as f:
            if tensor in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                return f.get_tensor(tensor).float()
    raise KeyError(f"tensor {tensor!r} missing from the checkpoint in {folder}")


def _gguf_file(folder: Path) -> Path | None:
    """The GGUF the model was converted from, when the store still has it."""
    manifest = folder / "genmesh.json"
    if not manifest.exists():
        return None
    info = json.loads(manifest.read_text())
    name, source = info.get("gguf_file"), str(info.get("source", ""))
    if not name or not source.startswith("pypi:"):
        return None
    from genmesh.core.models.convert import package_folder

    try:
        path = package_folder(source.removeprefix("pypi:").replace("-", "_")) / name
    except FileNotFoundError:
        return None
    return path if path.exists() else None


@functools.lru_cache(maxsize=2)
def _gguf_tensors(path: Path) -> dict[str, Any]:
    """A GGUF's tensors by name (memory-mapped). Read once a process: the reader parses
    every metadata field on opening, the tokenizer's ~100k strings among them (~4 s)."""
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def gguf_q4_1_layers(path: Path, cfg: ModelConfig) -> dict[str, QuantizedWeight] | None:
    """Every layer's fused matmuls from a GGUF's Q4_1 blocks, or None when any of them is
    not Q4_1. Q and K rows are put back in HF's order (llama.cpp's converter interleaves
    each head's rotary halves; transformers' GGUF loader undoes it the same way)."""
    import gguf

    by_name = _gguf_tensors(path)
    out: dict[str, QuantizedWeight] = {}
    for i in range(cfg.num_layers):
        for name in MATMULS:
            qs, ds, ms = [], [], []
            for _, part in _PARTS[name]:
                t = by_name.get(f"blk.{i}.{part}.weight")
                if t is None or t.tensor_type != gguf.GGMLQuantizationType.Q4_1:
                    return None
                q, d, m = _q4_1_blocks(np.asarray(t.data))
                if part in ("attn_q", "attn_k"):
                    heads = cfg.num_heads if part == "attn_q" else cfg.num_kv_heads
                    order = _unpermute_rows(q.shape[0], heads)
                    q, d, m = q[order], d[order], m[order]
                qs.append(q)
                ds.append(d)
                ms.append(m)
            out[f"layers.{i}.{name}"] = QuantizedWeight(
                q=torch.from_numpy(np.concatenate(qs)).contiguous(),
                scales=torch.from_numpy(np.concatenate(ds)).contiguous(),
                offsets=torch.from_numpy(np.concatenate(ms)).contiguous(),
                group_size=Q4_1_BLOCK, dtype=torch.bfloat16)
    return out


def gguf_q8_0_head(path: Path, cfg: ModelConfig) -> QuantizedWeight | None:
    """The LM head (the embedding when tied) from a GGUF's Q8_0 blocks (d fp16, then 32
    int8: our int8 in groups of 32); None when the GGUF holds it otherwise."""
    import gguf

    name = "token_embd.weight" if cfg.tie_word_embeddings else "output.weight"
    t = _gguf_tensors(path).get(name)
    if t is None or t.tensor_type != gguf.GGMLQuantizationType.Q8_0:
        return None
    data = np.asarray(t.data)
    blocks = data.reshape(data.shape[0], -1, 34)
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0]
    q = np.ascontiguousarray(blocks[:, :, 2:34]).view(np.int8).reshape(data.shape[0], -1)
    return QuantizedWeight(q=torch.from_numpy(q).contiguous(),
                           scales=torch.from_numpy(d).contiguous(), offsets=None,
                           group_size=LM_HEAD_GROUP_SIZE, dtype=torch.bfloat16)


def _q4_1_blocks(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_1 tensor's raw rows [N, B * 20] -> (packed [N, B * 16] uint8 in our layout,
    d [N, B] fp16, m [N, B] fp16). Each block: d (fp16), m (fp16), then 16 bytes whose
    byte j holds weights j (low nibble) and j + 16 (high); we pack by 64 (quant.py)."""
    n = data.shape[0]
    blocks = data.reshape(n, -1, 20)
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0]
    m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0]
    nibbles = np.ascontiguousarray(blocks[:, :, 4:20])  # [N, B, 16]
    q = np.stack([nibbles & 0x0F, nibbles >> 4], axis=2).reshape(n, -1)  # [N, K] in order
    return pack_int4(torch.from_numpy(q)).numpy(), d, m


def _unpermute_rows(rows: int, heads: int) -> np.ndarray:
    """The row order that undoes llama.cpp's rotary permutation of a Q or K weight."""
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(rows)
