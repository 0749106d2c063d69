"""``genmesh bench engine --variants ngram,draft``: speculative decoding beside plain
decoding, in one run.

Two prompt sets, single stream, greedy, every prompt run plain and then speculative
back to back (the machine is shared; neighbours share its noise):

- input-grounded: editing, rewriting and refactoring, where the answer repeats the
  prompt (what n-gram lookup is for);
- open-ended: chat and prose questions, where it rarely does (speculation must back off).

For each: decode tokens/s as a ratio to plain decoding (first token excluded: the
prefill is the same work), over all prompts and over those whose answer does repeat
them (a small model does not always do what an editing prompt asks), the number of
prompts whose output is token-for-token identical to plain decoding, the draft
acceptance rate and tokens emitted per verifying step. Then ``streams`` requests at
once, whose throughput must not drop (speculation backs off in large batches), and the
pool must be all free afterwards.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from genmesh.bench.variants import CHAT, PROSE, batch_throughput, chat_prompts
from services.worker.engine.config import EngineConfig
from services.worker.engine.core import EngineCore
from services.worker.engine.params import SamplingParams

_CODE_A = '''def average(values):
    total = 0
    for value in values:
        total = total + value
    return total / len(values)


def spread(values):
    low = min(values)
    high = max(values)
    return high - low
'''
_CODE_B = '''class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

    def is_empty(self):
        return len(self.items) == 0
'''
_CODE_C = '''function greet(name) {
  const message = "Hello, " + name + "!";
  console.log(message);
  return message;
}

function farewell(name) {
  const message = "Goodbye, " + name + ".";
  console.log(message);
  return message;
}
'''
_TEXT_A = ("Our team met on monday to discuss the new project. We agreed that the first "
           "version should be ready by the end of the month, and that every change must be "
           "reviewed by two people before it is merged. Anna will write the design "
           "document, and Ben will set up the test servers.")
_TEXT_B = ("The library opens at nine in the morning and closes at six in the evening. "
           "Visitors can borrow up to five books at a time for three weeks. Late returns "
           "cost ten cents a day. The reading room on the second floor is quiet, and "
           "phones must be switched off there.")
_TEXT_C = ("To make the soup, chop two onions and three carrots. Fry the onions in butter "
           "until they are soft, then add the carrots and a litre of stock. Simmer for "
           "twenty minutes, blend until smooth, and season with salt and pepper.")

GROUNDED = [
    f"Rename the function average to mean in this code. Show the whole code.\n\n{_CODE_A}",
    f"Add a docstring to each function in this code. Show the whole code.\n\n{_CODE_A}",
    f"Rename the class Stack to LifoStack. Show the whole code.\n\n{_CODE_B}",
    f"Add a method peek that returns the top item without removing it. Show the whole "
    f"class.\n\n{_CODE_B}",
    f"Change every const to let in this code. Show the whole code.\n\n{_CODE_C}",
    f"Rewrite this code to use template strings. Show the whole code.\n\n{_CODE_C}",
    f"Fix the capitalisation in this text and repeat it in full:\n\n{_TEXT_A}",
    f"Repeat this text, replacing Anna with Clara:\n\n{_TEXT_A}",
    f"Copy this notice, changing six in the evening to eight in the evening:\n\n{_TEXT_B}",
    f"Rewrite this notice as a bulleted list, keeping its wording:\n\n{_TEXT_B}",
    f"Repeat this recipe, with the steps numbered:\n\n{_TEXT_C}",
    f"Summarise this recipe in two sentences, using its own words:\n\n{_TEXT_C}",
]
OPEN_ENDED = CHAT[:6] + PROSE[:6]


def decode_run(core: EngineCore, rid: str, prompt: list[int], max_tokens: int
               ) -> tuple[list[int], float]:
    """A single stream's tokens and its decode seconds (first token to last)."""
    core.add(core.make_request(rid, prompt, SamplingParams(max_tokens=max_tokens)))
    tokens: list[int] = []
    first = None
    while core.has_work():
        for delta in core.step():
            tokens.extend(delta.new_token_ids)
            if first is None and delta.new_token_ids:
                first = time.perf_counter()
    assert first is not None
    return tokens, time.perf_counter() - first


def compare_set(plain: EngineCore, spec: EngineCore, prompts: list[list[int]], *,
                max_tokens: int) -> dict[str, Any]:
    """Plain then speculative decoding of each prompt; ratio of decode tokens/s."""
    before = spec.stats()
    identical = 0
    runs = []  # (plain seconds, speculative seconds, repeat rate) per prompt
    for i, prompt in enumerate(prompts):
        ref, t_plain = decode_run(plain, f"plain{i}", prompt, max_tokens)
        out, t_spec = decode_run(spec, f"spec{i}", prompt, max_tokens)
        identical += out == ref
        runs.append((t_plain, t_spec, repeat_rate(prompt, ref)))
    after = spec.stats()
    repeating = [r for r in runs if r[2] >= REPEATING]
    proposed = after.spec_proposed_tokens - before.spec_proposed_tokens
    verifications = after.spec_verifications - before.spec_verifications
    return {
        "prompts": len(prompts),
        "identical_outputs": identical,
        "decode_speedup": round(sum(r[0] for r in runs) / sum(r[1] for r in runs), 3),
        # Prompts whose answer repeats them (REPEATING of its tokens or more continue a
        # 3-gram seen before): what the issue calls input-grounded, judged by the answer.
        "repeating_prompts": len(repeating),
        "repeating_decode_speedup": round(
            sum(r[0] for r in repeating) / sum(r[1] for r in repeating), 3)
        if repeating else None,
        "per_prompt": [{"speedup": round(p / s, 2), "repeat_rate": round(rate, 2)}
                       for p, s, rate in runs],
        "acceptance_rate": round(
            (after.spec_accepted_tokens - before.spec_accepted_tokens) / proposed, 3)
        if proposed else 0.0,
        "tokens_per_verifying_step": round(
            (after.spec_emitted_tokens - before.spec_emitted_tokens) / verifications, 2)
        if verifications else 0.0,
        "verifying_steps": verifications,
    }


REPEATING = 0.5  # an answer repeats its prompt when this share of it continues 3-grams


def repeat_rate(prompt: list[int], answer: list[int]) -> float:
    """The share of the answer's tokens (from its third) that continue a 3-gram seen
    earlier in the prompt or the answer: how much of it is repeated text."""
    if len(answer) < 3:
        return 0.0
    seen = {tuple(prompt[i:i + 3]) for i in range(len(prompt) - 2)}
    text = prompt[-2:] + answer
    hits = 0
    for i in range(2, len(text)):
        gram = tuple(text[i - 2:i + 1])
        hits += gram in seen
        seen.add(gram)
    return hits / (len(text) - 2)


def spec_config(config: EngineConfig, mode: str) -> EngineConfig:
    """``mode``: "ngram", or "draft" (the int4 build of the model drafts for itself)."""
    if mode == "ngram":
        return replace(config, speculative="ngram")
    if mode == "draft":
        return replace(config, speculative="draft", speculative_draft_model=config.model,
                       speculative_draft_quantization="int4")
    raise ValueError(f"unknown speculation mode {mode!r}")


def run_speculation(config: EngineConfig, modes: list[str], *, max_tokens: int = 128,
                    streams: int = 64, stream_tokens: int = 32,
                    on_progress: Callable[[dict[str, Any]], None] | None = None
                    ) -> dict[str, Any]:
    grounded = chat_prompts(config.model, GROUNDED)
    open_ended = chat_prompts(config.model, OPEN_ENDED)
    result: dict[str, Any] = {"max_tokens": max_tokens, "streams": streams}
    plain = EngineCore(replace(config, speculative="off"))
    try:
        decode_run(plain, "warmup", grounded[0], 4)
        for mode in modes:
            spec = EngineCore(spec_config(config, mode))
            try:
                decode_run(spec, "warmup", grounded[0], 4)
                entry: dict[str, Any] = {
                    "grounded": compare_set(plain, spec, grounded, max_tokens=max_tokens),
                    "open_ended": compare_set(plain, spec, open_ended, max_tokens=max_tokens),
                }
                t_plain = batch_throughput(plain, open_ended, streams=streams,
                                           tokens=stream_tokens)
                t_spec = batch_throughput(spec, open_ended, streams=streams,
                                          tokens=stream_tokens)
                stats = spec.stats()
                entry["batch_ratio"] = round(t_spec / t_plain, 3)
                entry["pool_all_free_after"] = (
                    stats.num_kv_blocks_free == stats.num_kv_blocks_total)
                result[mode] = entry
            finally:
                spec.structured.shutdown()
                del spec
                gc.collect()
            if on_progress is not None:
                on_progress(result)
    finally:
        plain.structured.shutdown()
    return result
