"""Build ModelWeights from an HF safetensors folder, or random ("dummy") weights."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from services.worker.engine.model.config import ModelConfig
from services.worker.engine.model.llama import LayerWeights, ModelWeights


def _open_all(folder: Path) -> dict[str, tuple[Path, str]]:
    """Map every tensor name to its shard file."""
    # quant-*.safetensors: prebuilt quantized layers (prebuilt.py), not the checkpoint.
    files = sorted(f for f in folder.glob("*.safetensors") if not f.name.startswith("quant-"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    index: dict[str, tuple[Path, str]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                index[name] = (f, name)
    return index


def load_hf_weights(folder: Path, cfg: ModelConfig, *, dtype: torch.dtype,
                    device: torch.device) -> ModelWeights:
    index = _open_all(folder)
    handles = {f: safe_open(str(f), framework="pt") for f in {p for p, _ in index.values()}}

    def get(name: str) -> torch.Tensor:
        if name not in index:
            raise KeyError(f"tensor {name!r} missing from the checkpoint in {folder}")
        path, key = index[name]
        return handles[path].get_tensor(key).to(device=device, dtype=dtype)

    def maybe(name: str) -> torch.Tensor | None:
        return get(name) if name in index else None

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        qkv = torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        biases = [maybe(p + f"self_attn.{n}_proj.bias") for n in "qkv"]
        qkv_bias = torch.cat([b for b in biases if b is not None]) if cfg.qkv_bias else None
        layers.append(LayerWeights(
            input_norm=get(p + "input_layernorm.weight"),
            qkv=qkv,
            qkv_bias=qkv_bias,
            o=get(p + "self_attn.o_proj.weight"),
            post_norm=get(p + "post_attention_layernorm.weight"),
            gate_up=torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]),
            down=get(p + "mlp.down_proj.weight"),
        ))
    embed = get("model.embed_tokens.weight")
    lm_head = embed if cfg.tie_word_embeddings else get("lm_head.weight")
    return ModelWeights(embed=embed, layers=layers, final_norm=get("model.norm.weight"),
                        lm_head=lm_head)


def dummy_weights(cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device,
                  seed: int = 0) -> ModelWeights:
    """Random weights of the right shapes, scaled so activations stay finite."""
    gen = torch.Generator(device=device).manual_seed(seed)
    d, i, h, hkv, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                        cfg.num_kv_heads, cfg.head_dim)

    def rand(*shape: int) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen, dtype=dtype, device=device)
        return t.mul_(shape[-1] ** -0.5)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype, device=device)

    layers = [
        LayerWeights(
            input_norm=ones(d),
            qkv=rand((h + 2 * hkv) * hd, d),
            qkv_bias=torch.zeros((h + 2 * hkv) * hd, dtype=dtype, device=device)
            if cfg.qkv_bias else None,
            o=rand(d, h * hd),
            post_norm=ones(d),
            gate_up=rand(2 * i, d),
            down=rand(d, i),
        )
        for _ in range(cfg.num_layers)
    ]
    embed = rand(cfg.vocab_size, d)
    lm_head = embed if cfg.tie_word_embeddings else rand(cfg.vocab_size, d)
    return ModelWeights(embed=embed, layers=layers, final_norm=ones(d), lm_head=lm_head)
