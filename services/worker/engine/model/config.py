"""The shape of a Llama-family model, read from an HF ``config.json`` or a preset."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str  # "llama", "mistral" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when fewer than num_heads)
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 has biases on q/k/v
    eos_token_ids: tuple[int, ...]  # tokens that end generation unless ignore_eos
    rope_scaling: dict[str, Any] | None = None  # Llama 3.x "llama3" scaling, else None
    sliding_window: int | None = None  # Mistral; the context is capped to it

    @property
    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, i, L = self.hidden_size, self.intermediate_size, self.num_layers
        qkv = d * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        o = self.num_heads * self.head_dim * d
        per_layer = qkv + o + 3 * d * i + 2 * d
        emb = self.vocab_size * d
        return L * per_layer + emb * (1 if self.tie_word_embeddings else 2) + d

    @property
    def kv_bytes_per_token_per_element(self) -> int:
        """K and V elements stored per token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def _eos_ids(folder: Path, raw: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (raw, _read_json(folder / "generation_config.json")):
        eos = source.get("eos_token_id")
        for t in (eos if isinstance(eos, list) else [eos]):
            if isinstance(t, int) and t not in ids:
                ids.append(t)
    return tuple(ids)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def from_hf_dict(raw: dict[str, Any], *, eos_token_ids: tuple[int, ...] = ()) -> ModelConfig:
    model_type = raw.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; "
            f"supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    num_heads = raw["num_attention_heads"]
    # transformers 5 keeps rope settings under rope_parameters; 4.x at the top level.
    rope = raw.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    # A v5 rope_parameters of any non-default type is scaling too (checked below).
    scaling = raw.get("rope_scaling") or (
        rope if rope.get("rope_type", "default") != "default" else None
    )
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default"):
        raise ValueError(f"rope scaling {scaling!r} is not supported (only llama3)")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return ModelConfig(
        model_type=model_type,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
        eos_token_ids=eos_token_ids,
        rope_scaling=dict(scaling) if scaling else None,
        sliding_window=raw.get("sliding_window") if model_type == "mistral" else None,
    )


def load_model_config(folder: Path) -> ModelConfig:
    raw = _read_json(folder / "config.json")
    if not raw:
        raise FileNotFoundError(f"no config.json in {folder}")
    return from_hf_dict(raw, eos_token_ids=_eos_ids(folder, raw))


# Shapes for dummy-weight benchmarks (load_format="dummy"), no download needed.
PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        qkv_bias=False, eos_token_ids=(2,),
    ),
    "llama-3-8b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False,
        qkv_bias=False, eos_token_ids=(128001, 128009),
    ),
    # A toy shape for fast end-to-end tests of the engine's plumbing.
    "tiny-llama": ModelConfig(
        model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=True,
        qkv_bias=False, eos_token_ids=(2,),
    ),
    "qwen2-0.5b": ModelConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True,
        qkv_bias=True, eos_token_ids=(151645,),
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return replace(PRESETS[name], **overrides)
