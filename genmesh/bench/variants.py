"""``genmesh bench engine --variants``: each quantization beside bf16, in one run.

Speed: single-stream decode tokens/s and the throughput of 64 streams at once, each as
a ratio to bf16 measured in the same run. Each variant is loaded beside bf16 and the two
are measured in turn, round after round (best of the rounds): the machine is shared and
its speed drifts over minutes, so variants measured one after the other saw different
machines (bf16 ran at 75 to 210 tok/s on different days here).

Quality, against bf16 on the same 64 prompts (chat, code and prose, 128 tokens each):
bf16 writes each answer greedily; every variant (bf16 too) then reads the prompt and
bf16's answer (teacher forcing) the way a single stream is served, one decode step per
token, and at each of the 128 positions we compare its next-token distribution with
bf16's over the same text: the top-1 agreement (the fraction of positions where both
pick the same token) and the mean KL(bf16 || variant).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from genmesh.core.models.chat_template import ChatMessage, ChatTemplate, load_chat_template
from services.worker.engine.config import EngineConfig
from services.worker.engine.core import EngineCore
from services.worker.engine.model.attention import (
    AttentionMetadata,
    DecodeGroup,
    PrefillChunk,
)
from services.worker.engine.model.llama import LlamaModel
from services.worker.engine.outputs import Delta
from services.worker.engine.params import SamplingParams

CHAT = [
    "What are three tips for sleeping better?", "How do I politely decline a meeting?",
    "Explain what inflation is to a teenager.", "What should I pack for a weekend hike?",
    "How can I learn a new language faster?", "Why do cats purr?",
    "Give me a simple recipe for pancakes.", "What is the difference between weather and "
    "climate?", "How do I start running if I have never run before?",
    "What are good questions to ask in a job interview?", "How does a credit score work?",
    "Suggest a name for a small bakery and explain it.", "How do vaccines train the "
    "immune system?", "What is a healthy breakfast for a busy morning?",
    "How can I make my houseplants grow better?", "Why is the ocean salty?",
    "How do I write a thank-you note to a teacher?", "What is the best way to study for "
    "an exam?", "How do airplanes stay in the air?", "What are the benefits of walking "
    "every day?", "How do I deal with a noisy neighbour?", "Why do leaves change colour "
    "in autumn?",
]
CODE = [
    "Write a Python function that reverses a string.", "Write a Python function that "
    "checks whether a number is prime.", "Write a SQL query that counts orders per "
    "customer.", "Explain what a Python list comprehension is, with an example.",
    "Write a JavaScript function that debounces another function.", "Write a Python "
    "class for a simple bank account.", "How do I read a CSV file in Python?",
    "Write a bash command that finds the ten largest files in a folder.",
    "Write a Python function that merges two sorted lists.", "Explain the difference "
    "between a process and a thread.", "Write a Python function that computes the "
    "Fibonacci numbers up to n.", "Write a regular expression that matches an email "
    "address.", "How do I handle exceptions in Python?", "Write a function in C that "
    "swaps two integers.", "Explain what Big-O notation means.", "Write a Python "
    "function that counts the words in a text.", "Write a Rust function that sums a "
    "vector of integers.", "How does a hash map work?", "Write a Python generator that "
    "yields the lines of a file.", "Write a unit test for a function that adds two "
    "numbers.", "Explain recursion with a short example.",
]
PROSE = [
    "Write a short story about a lighthouse keeper.", "Describe a busy market in the "
    "morning.", "Write a poem about the sea.", "Describe the first day of spring in a "
    "small village.", "Write a letter from a traveller to a friend at home.",
    "Describe a thunderstorm over the mountains.", "Write the opening paragraph of a "
    "mystery novel.", "Describe the smell of a bakery.", "Write a fable about a fox and "
    "a crow.", "Describe a city at night from a rooftop.", "Write a short speech for a "
    "graduation.", "Describe an old library.", "Write a diary entry of a sailor.",
    "Describe a forest after the rain.", "Write a short story about a lost dog finding "
    "its way home.", "Describe a train journey through the countryside.",
    "Write a paragraph about the importance of friendship.", "Describe a winter morning "
    "in the city.", "Write a haiku sequence about the moon.", "Describe a chess game "
    "between two old friends.", "Write a short story about a robot learning to paint.",
]
QUALITY_PROMPTS = CHAT + CODE + PROSE  # 64
QUALITY_TOKENS = 128


def chat_prompts(model_dir: str, texts: Sequence[str]) -> list[list[int]]:
    """Each text as a one-turn chat, rendered with the model's template and tokenized."""
    tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    source = load_chat_template(Path(model_dir))
    template = ChatTemplate(source) if source else None
    out = []
    for text in texts:
        rendered = (template.render([ChatMessage(role="user", content=text)])
                    if template else text)
        out.append(tokenizer.encode(rendered, add_special_tokens=False).ids)
    return out


def run_to_end(core: EngineCore, requests: dict[str, tuple[list[int], SamplingParams]]
               ) -> dict[str, list[Delta]]:
    """Every request's deltas, the engine stepped until all are done."""
    out: dict[str, list[Delta]] = {rid: [] for rid in requests}
    for rid, (prompt, params) in requests.items():
        core.add(core.make_request(rid, prompt, params))
    while core.has_work():
        for delta in core.step():
            out[delta.request_id].append(delta)
    return out


def tokens_of(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.new_token_ids]


def teacher_forced_logits(model: LlamaModel, ids: list[int], first: int) -> torch.Tensor:
    """fp32 logits [len(ids) - first, V]: row i predicts ids[first + i] from ids before it.

    The way serving computes them: ids[:first] in one prefill, then one decode step per
    token (the single-stream path, where quantized weights go through their own kernel;
    a prefill of many rows takes the batched path)."""
    cfg, device = model.cfg, model.w.embed.device
    n, block = len(ids), 16
    num_blocks = -(-n // block)
    shape = (num_blocks, block, cfg.num_kv_heads, cfg.head_dim)
    caches = [(torch.zeros(shape, dtype=model.w.embed.dtype, device=device),
               torch.zeros(shape, dtype=model.w.embed.dtype, device=device))
              for _ in range(cfg.num_layers)]
    prefill = AttentionMetadata(slot_mapping=torch.arange(first, device=device),
                                decode_groups=[],
                                prefills=[PrefillChunk(token_slice=slice(0, first), start=0,
                                                       block_ids=None, mask=None)])
    rows = [model.forward(torch.tensor(ids[:first], device=device),
                          torch.arange(first, device=device), prefill, caches,
                          torch.tensor([first - 1], device=device))]
    table = torch.arange(num_blocks, device=device).unsqueeze(0)
    span = torch.arange(num_blocks * block, device=device)
    one = torch.zeros(1, dtype=torch.int64, device=device)
    for pos in range(first, n - 1):
        at = torch.tensor([pos], device=device)
        mask = None if model.decode_attention is not None else (
            span <= pos).view(1, 1, 1, -1)  # SDPA over the gathered blocks needs one
        step = AttentionMetadata(
            slot_mapping=at, prefills=[],
            decode_groups=[DecodeGroup(token_slice=slice(0, 1), block_table=table,
                                       ctx_lens=at + 1, mask=mask)])
        rows.append(model.forward(torch.tensor([ids[pos]], device=device), at, step, caches,
                                  one))
    return torch.cat(rows)


def compare(ref: torch.Tensor, other: torch.Tensor) -> tuple[int, float]:
    """(positions whose top-1 agrees, the sum of KL(ref || other) over positions)."""
    agree = int((ref.argmax(-1) == other.argmax(-1)).sum())
    logp, logq = ref.log_softmax(-1), other.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return agree, float(kl.sum())


def decode_speed(core: EngineCore, prompt: list[int], *, tokens: int, repeats: int) -> float:
    """Best single-stream decode tokens/s over ``repeats`` runs (first token excluded)."""
    best = 0.0
    for i in range(repeats):
        core.add(core.make_request(f"speed{i}", prompt,
                                   SamplingParams(max_tokens=tokens, ignore_eos=True)))
        first = None
        while core.has_work():
            if core.step() and first is None:
                first = time.perf_counter()
        assert first is not None
        best = max(best, (tokens - 1) / (time.perf_counter() - first))
    return best


def batch_throughput(core: EngineCore, prompts: list[list[int]], *, streams: int,
                     tokens: int) -> float:
    """Generated tokens/s of ``streams`` requests submitted at once."""
    requests = {f"batch{i}": (prompts[i % len(prompts)],
                              SamplingParams(max_tokens=tokens, ignore_eos=True))
                for i in range(streams)}
    t0 = time.perf_counter()
    out = run_to_end(core, requests)
    return sum(len(tokens_of(d)) for d in out.values()) / (time.perf_counter() - t0)


def interleaved(cores: dict[str, EngineCore], measure: Callable[[EngineCore], float], *,
                rounds: int) -> dict[str, list[float]]:
    """``measure`` of every core, round after round (each core once a round): the
    machine's speed drifts over minutes, and each variant then sees the same drift."""
    runs: dict[str, list[float]] = {name: [] for name in cores}
    for _ in range(rounds):
        for name, core in cores.items():
            runs[name].append(measure(core))
    return runs


def run_variants(config: EngineConfig, variants: Sequence[str], *, num_prompts: int = 64,
                 quality_tokens: int = QUALITY_TOKENS, speed_tokens: int = 128,
                 speed_repeats: int = 5, batch_repeats: int = 2, streams: int = 64,
                 stream_tokens: int = 32,
                 on_progress: Callable[[dict[str, Any]], None] | None = None
                 ) -> dict[str, Any]:
    """bf16 ("none") and each variant: quality against bf16, and speed, each variant
    loaded beside bf16 in turn (at most two engines in memory: each keeps its weights,
    a packed bf16 copy and a KV pool) and the two measured round after round (best of
    ``speed_repeats`` rounds, and of ``batch_repeats`` for 64 streams): a variant's
    ratios are to the bf16 rounds run beside it."""
    prompts = chat_prompts(config.model, QUALITY_PROMPTS[:num_prompts])
    result: dict[str, Any] = {"quality_prompts": len(prompts),
                              "quality_tokens": quality_tokens, "streams": streams}

    def decode(core: EngineCore) -> float:
        return decode_speed(core, prompts[0], tokens=speed_tokens, repeats=1)

    def batch(core: EngineCore) -> float:
        return batch_throughput(core, prompts, streams=streams, tokens=stream_tokens)

    def warm(core: EngineCore) -> EngineCore:
        run_to_end(core, {"warmup": (prompts[0], SamplingParams(max_tokens=4))})
        return core

    base = warm(EngineCore(replace(config, quantization="none")))
    try:
        out = run_to_end(base, {str(i): (p, SamplingParams(
            max_tokens=quality_tokens, ignore_eos=True)) for i, p in enumerate(prompts)})
        references = [tokens_of(out[str(i)]) for i in range(len(prompts))]
        ref_logits = [teacher_forced_logits(base.runner.model, p + a, len(p))
                      for p, a in zip(prompts, references, strict=True)]
        base_decode: list[float] = []
        base_batch: list[float] = []
        result["none"] = {}  # first in the report; filled as bf16's rounds come in
        others = [v for v in variants if v != "none"]
        if not others:  # bf16 alone
            base_decode = interleaved({"none": base}, decode, rounds=speed_repeats)["none"]
            base_batch = interleaved({"none": base}, batch, rounds=batch_repeats)["none"]
        for name in others:
            core = warm(EngineCore(replace(config, quantization=name)))
            try:
                pair = {"none": base, name: core}
                d = interleaved(pair, decode, rounds=speed_repeats)
                b = interleaved(pair, batch, rounds=batch_repeats)
                base_decode += d["none"]
                base_batch += b["none"]
                agree, kl_sum, positions = 0, 0.0, 0
                for i, (prompt, answer) in enumerate(zip(prompts, references, strict=True)):
                    logits = teacher_forced_logits(core.runner.model, prompt + answer,
                                                   len(prompt))
                    a, k = compare(ref_logits[i], logits)
                    agree, kl_sum, positions = agree + a, kl_sum + k, positions + len(answer)
                result[name] = {
                    "weight_bytes_per_token": core.runner.weight_bytes_per_token,
                    "decode_tokens_per_s": round(max(d[name]), 2),
                    "decode_tokens_per_s_rounds": [round(v, 1) for v in d[name]],
                    "batch_tokens_per_s": round(max(b[name]), 2),
                    "decode_speedup": round(max(d[name]) / max(d["none"]), 2),
                    "decode_speedup_rounds": [round(v / w, 2) for v, w in
                                              zip(d[name], d["none"], strict=True)],
                    "batch_ratio": round(max(b[name]) / max(b["none"]), 2),
                    "quality": {"top1_agreement": round(agree / positions, 4),
                                "mean_kl": round(kl_sum / positions, 5),
                                "positions": positions},
                }
            finally:
                core.structured.shutdown()
                del core
                gc.collect()
            result["none"] = _base_entry(base, base_decode, base_batch)
            if on_progress is not None:
                on_progress(result)
        result["none"] = _base_entry(base, base_decode, base_batch)
    finally:
        base.structured.shutdown()
    return result


def _base_entry(core: EngineCore, decode: list[float], batch: list[float]
                ) -> dict[str, Any]:
    """bf16's speed over every round it ran (beside each variant in turn)."""
    return {"weight_bytes_per_token": core.runner.weight_bytes_per_token,
            "decode_tokens_per_s": round(max(decode), 2),
            "decode_tokens_per_s_rounds": [round(v, 1) for v in decode],
            "batch_tokens_per_s": round(max(batch), 2)}
