"""Llama 3.1, Qwen2 and Mistral checkpoints run in our engine exactly as in HF transformers.

Each test builds a tiny random model with transformers, saves it as safetensors and
compares greedy tokens from ``EngineCore`` with ``model.generate``. The weights are
drawn wider than transformers' default (``initializer_range``) so attention is sharp
and RoPE changes the output: a wrong rotation or scaling shows up as other tokens.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from services.worker.engine.config import EngineConfig
from services.worker.engine.core import EngineCore
from services.worker.engine.model.config import (
    ModelConfig,
    from_hf_dict,
    load_model_config,
    preset,
)
from services.worker.engine.model.llama import rope_inv_freq
from services.worker.engine.params import SamplingParams

VOCAB = 300
MAX_NEW_TOKENS = 12
PROMPT_LENS = (5, 17, 40)  # with a 16-token step budget the two longer prefills are chunked
LLAMA3_ROPE = {  # Llama 3.1's scaling, with the original context shrunk to fit the model
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
}


def tiny(**overrides: object) -> dict[str, object]:
    shape: dict[str, object] = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
        initializer_range=0.2,
    )
    shape.update(overrides)
    return shape


def llama31() -> PreTrainedModel:
    return LlamaForCausalLM(LlamaConfig(**tiny(rope_parameters=LLAMA3_ROPE)))


def qwen2() -> PreTrainedModel:
    model = Qwen2ForCausalLM(Qwen2Config(**tiny(
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )))
    with torch.no_grad():  # transformers starts biases at zero; make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    return model


def mistral() -> PreTrainedModel:
    # head_dim 32 is not hidden_size / num_heads (as in Mistral NeMo).
    return MistralForCausalLM(MistralConfig(**tiny(head_dim=32, sliding_window=4096)))


BUILDERS = {"llama": llama31, "qwen2": qwen2, "mistral": mistral}


def save(arch: str, folder: Path) -> PreTrainedModel:
    torch.manual_seed(0)
    model = BUILDERS[arch]().eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def engine_greedy(folder: Path, prompt_ids: list[list[int]], *,
                  model_cfg: ModelConfig | None = None) -> list[list[int]]:
    config = EngineConfig(model=str(folder), dtype="float32", block_size=4,
                          max_num_batched_tokens=16, num_kv_blocks=64)
    core = EngineCore(config, model_cfg=model_cfg)
    params = SamplingParams(max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    for i, p in enumerate(prompt_ids):
        core.add(core.make_request(str(i), p, params))
    outputs: list[list[int]] = [[] for _ in prompt_ids]
    while core.has_work():
        for delta in core.step():
            outputs[int(delta.request_id)].extend(delta.new_token_ids)
    return outputs


def hf_greedy(model: PreTrainedModel, prompt_ids: list[list[int]]) -> list[list[int]]:
    model.generation_config.eos_token_id = None  # run all MAX_NEW_TOKENS, like ignore_eos
    outputs = []
    with torch.inference_mode():
        for p in prompt_ids:
            out = model.generate(torch.tensor([p]), do_sample=False,
                                 max_new_tokens=MAX_NEW_TOKENS, pad_token_id=0)
            outputs.append(out[0, len(p):].tolist())
    assert [len(o) for o in outputs] == [MAX_NEW_TOKENS] * len(prompt_ids)
    return outputs


@pytest.mark.parametrize("arch", BUILDERS)
def test_greedy_tokens_match_hf(arch, tmp_path):
    model = save(arch, tmp_path)
    ids = prompts()
    assert engine_greedy(tmp_path, ids) == hf_greedy(model, ids)


def test_loaded_configs_carry_each_architectures_quirks(tmp_path):
    for arch in BUILDERS:
        save(arch, tmp_path / arch)
    llama = load_model_config(tmp_path / "llama")
    qwen = load_model_config(tmp_path / "qwen2")
    mis = load_model_config(tmp_path / "mistral")
    assert llama.rope_scaling is not None and llama.rope_scaling["factor"] == 8.0
    assert llama.rope_theta == 500000.0 and not llama.qkv_bias
    assert qwen.qkv_bias and qwen.tie_word_embeddings and qwen.rope_theta == 1e6
    assert qwen.rope_scaling is None and qwen.sliding_window is None
    assert (mis.head_dim, mis.sliding_window, mis.rope_scaling) == (32, 4096, None)


def test_llama3_scaling_changes_the_tiny_models_output(tmp_path):
    # Guards the match above: without the scaling the same weights generate other tokens.
    model = save("llama", tmp_path)
    unscaled = replace(load_model_config(tmp_path), rope_scaling=None)
    ids = prompts()
    assert engine_greedy(tmp_path, ids, model_cfg=unscaled) != hf_greedy(model, ids)


@pytest.mark.parametrize(("head_dim", "original_ctx", "max_ctx"), [(16, 64, 256),
                                                                   (128, 8192, 131072)])
def test_llama3_rope_inv_freq_matches_transformers(head_dim, original_ctx, max_ctx):
    rope = dict(LLAMA3_ROPE, original_max_position_embeddings=original_ctx)
    hf = LlamaConfig(**tiny(hidden_size=4 * head_dim, head_dim=head_dim,
                            max_position_embeddings=max_ctx, rope_parameters=rope))
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    ours = rope_inv_freq(from_hf_dict(hf.to_dict()))
    assert ours.shape == (head_dim // 2,)
    assert torch.allclose(ours, expected, rtol=1e-6, atol=0)


def test_llama3_rope_reads_the_same_from_transformers_4_layout():
    v5 = LlamaConfig(**tiny(rope_parameters=LLAMA3_ROPE)).to_dict()
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4["rope_theta"] = LLAMA3_ROPE["rope_theta"]
    v4["rope_scaling"] = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    assert torch.equal(rope_inv_freq(from_hf_dict(v4)), rope_inv_freq(from_hf_dict(v5)))


@pytest.mark.parametrize("layout", ["rope_scaling", "rope_parameters"])
def test_unsupported_rope_scaling_is_refused_in_either_layout(layout):
    raw = Qwen2Config(**tiny()).to_dict()
    raw[layout] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                   "original_max_position_embeddings": 64}
    with pytest.raises(ValueError, match="yarn"):
        from_hf_dict(raw)


def test_llama_3_8b_preset_has_8b_parameters():
    assert preset("llama-3-8b").num_params == pytest.approx(8.03e9, rel=0.01)


def test_scaled_down_llama_3_8b_preset_generates_in_bfloat16():
    cfg = preset("llama-3-8b", hidden_size=128, intermediate_size=256, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=32, vocab_size=1000)
    config = EngineConfig(model="llama-3-8b", load_format="dummy", dtype="bfloat16",
                          num_kv_blocks=16, block_size=4, max_num_batched_tokens=16)
    core = EngineCore(config, model_cfg=cfg)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    core.add(core.make_request("greedy", list(range(1, 21)), params))
    core.add(core.make_request("sampled", [5, 6, 7],
                               replace(params, temperature=0.8, top_p=0.9, seed=3)))
    outputs: dict[str, list[int]] = {"greedy": [], "sampled": []}
    while core.has_work():
        for delta in core.step():
            outputs[delta.request_id].extend(delta.new_token_ids)
    assert core.runner.kv_caches[0][0].dtype == torch.bfloat16
    assert [len(t) for t in outputs.values()] == [6, 6]
    assert all(0 <= t < 1000 for tokens in outputs.values() for t in tokens)
