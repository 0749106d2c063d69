"""Greedy output of the engine equals HF transformers' generate, token for token."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from genmesh.core.models.store import default_store_root
from services.worker.engine.params import SamplingParams
from tests.services.worker.engine.helpers import engine, run_all, varied_texts

MAX_NEW_TOKENS = 24
GREEDY = SamplingParams(max_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def prompts(model_dir: Path) -> list[list[int]]:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # A shared chat preamble gives later prompts a cacheable common prefix.
    preamble = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
                "by Hugging Face<|im_end|>\n<|im_start|>user\n")
    ids = [tok.encode(preamble + t + "<|im_end|>\n<|im_start|>assistant\n").ids
           for t in varied_texts(16)]
    assert min(map(len, ids)) < 60 and max(map(len, ids)) > 400
    return ids


@pytest.fixture(scope="module")
def hf_outputs(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    """HF transformers' greedy fp32 generate of each prompt, computed once per model
    build, torch and transformers version, thread count and prompt set, then kept on
    disk (~30 s on two cores): the same inputs give the same reference."""
    import transformers

    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                   for f in model_dir.iterdir() if f.is_file())
    key = hashlib.sha256(json.dumps([files, torch.__version__, transformers.__version__,
                                     torch.get_num_threads(), MAX_NEW_TOKENS, prompts]
                                    ).encode()).hexdigest()[:24]
    memo = default_store_root().parent / "test-references" / f"hf-greedy-{key}.json"
    if memo.exists():
        return json.loads(memo.read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            out = model.generate(torch.tensor([p]), do_sample=False,
                                 max_new_tokens=MAX_NEW_TOKENS, pad_token_id=2)
            outs.append(out[0, len(p):].tolist())
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(outs))
    tmp.replace(memo)
    return outs


def test_single_request_matches_hf(model_dir, prompts, hf_outputs):
    eng = engine(model_dir)
    try:
        [(tokens, _)] = run_all(eng, prompts[5:6], GREEDY)
    finally:
        eng.shutdown()
    assert tokens == hf_outputs[5]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_staggered_concurrent_requests_match_hf(model_dir, prompts, hf_outputs, prefix_caching):
    # Half the prompts each (50 to 573 tokens, every one sharing the chat preamble): the
    # odd ones with prefix caching, the even ones without.
    picked = slice(1, None, 2) if prefix_caching else slice(None, None, 2)
    eng = engine(model_dir, enable_prefix_caching=prefix_caching, max_num_batched_tokens=256)
    try:
        results = run_all(eng, prompts[picked], GREEDY, stagger_s=0.05)
        stats = eng.stats()
    finally:
        eng.shutdown()
    assert [tokens for tokens, _ in results] == hf_outputs[picked]
    assert max(stats.recent_batch_sizes) > 1  # requests really shared steps
    cached = [last.usage.cached_prompt_tokens for _, last in results]
    if prefix_caching:
        assert sum(cached) > 0 and stats.prefix_cache_hits > 0
    else:
        assert sum(cached) == 0


def test_tiny_block_pool_forces_preemption_and_still_matches_hf(model_dir, prompts,
                                                                 hf_outputs):
    # 48 blocks of 16 = 768 token slots for 4 requests (of 152 to 573 prompt tokens) that
    # need ~1,560 together; the longest fits alone (38 blocks).
    eng = engine(model_dir, num_kv_blocks=48, max_num_batched_tokens=512)
    try:
        results = run_all(eng, prompts[3::4], GREEDY)
        stats = eng.stats()
    finally:
        eng.shutdown()
    assert stats.num_preemptions > 0
    assert [tokens for tokens, _ in results] == hf_outputs[3::4]
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total
