"""The HF baseline of a dummy-weight preset: a transformers model of the same shape."""

from __future__ import annotations

import pytest
import torch

from genmesh.bench.engine import hf_config
from services.worker.engine.model.config import PRESETS, from_hf_dict

pytest.importorskip("transformers")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_model_from_a_preset_has_the_presets_parameter_count(name):
    from transformers import AutoModelForCausalLM

    cfg = PRESETS[name]
    with torch.device("meta"):  # shapes only: the 8B model costs no memory
        model = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=torch.bfloat16)
    num_params = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    # num_params leaves out Qwen2's q/k/v biases; HF's model has them.
    biases = cfg.num_layers * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    assert num_params == cfg.num_params + (biases if cfg.qkv_bias else 0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_reads_back_as_the_preset(name):
    cfg = PRESETS[name]
    assert from_hf_dict(hf_config(cfg).to_dict(), eos_token_ids=cfg.eos_token_ids) == cfg


def test_llama3_rope_scaling_travels():
    from dataclasses import replace

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
    cfg = replace(PRESETS["tiny-llama"], rope_scaling=scaling)
    hf = hf_config(cfg)
    assert hf.rope_parameters == {**scaling, "rope_theta": cfg.rope_theta}
    back = from_hf_dict(hf.to_dict(), eos_token_ids=cfg.eos_token_ids)
    # transformers 5 keeps the theta inside rope_parameters; read back, it stays there
    assert back == replace(cfg, rope_scaling={**scaling, "rope_theta": cfg.rope_theta})
