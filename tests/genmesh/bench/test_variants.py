"""The variants benchmark's quality measure: teacher forcing the way a stream is served,
and the agreement/KL it reports."""

from __future__ import annotations

import math

import torch

from genmesh.bench.variants import compare, teacher_forced_logits
from services.worker.engine.config import EngineConfig
from services.worker.engine.model.attention import AttentionMetadata, PrefillChunk
from services.worker.engine.model_runner import ModelRunner, resolve_model_config


def test_one_decode_step_per_token_gives_what_one_prefill_gives():
    config = EngineConfig(model="tiny-llama", load_format="dummy", dtype="float32",
                          use_cpu_kernels=False)
    model = ModelRunner(config, resolve_model_config(config), num_blocks=4,
                        max_model_len=64).model
    ids = [5, 9, 17, 33, 2, 71, 8, 100, 3, 44, 12]
    stepwise = teacher_forced_logits(model, ids, first=4)
    n = len(ids)
    shape = (1, 16, model.cfg.num_kv_heads, model.cfg.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(model.cfg.num_layers)]
    meta = AttentionMetadata(slot_mapping=torch.arange(n), decode_groups=[],
                             prefills=[PrefillChunk(slice(0, n), 0, None, None)])
    at_once = model.forward(torch.tensor(ids), torch.arange(n), meta, caches,
                            torch.arange(3, n - 1))
    assert stepwise.shape == (n - 4, 512)
    torch.testing.assert_close(stepwise, at_once, rtol=1e-4, atol=1e-4)


def test_compare_counts_agreeing_positions_and_sums_the_kl():
    ref = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    other = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    agree, kl = compare(ref, other)
    assert agree == 1  # the second position's top-1 differs
    p = torch.softmax(ref[1], -1)
    expected = float((p * (p.log() - torch.log_softmax(other[1], -1))).sum())
    assert math.isclose(kl, expected, rel_tol=1e-6)


def test_variants_are_measured_in_turn_round_after_round():
    from genmesh.bench.variants import interleaved

    calls = []

    def measure(core):
        calls.append(core)
        return float(len(calls))

    runs = interleaved({"none": "a", "int4": "b"}, measure, rounds=3)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert runs == {"none": [1.0, 3.0, 5.0], "int4": [2.0, 4.0, 6.0]}


def test_each_variant_is_timed_beside_bf16_with_at_most_two_engines_loaded(monkeypatch):
    from types import SimpleNamespace

    from genmesh.bench import variants

    alive: list[str] = []
    most = [0]
    speeds = {"none": iter([10.0, 12.0, 11.0, 9.0]), "int4": iter([25.0, 24.0]),
              "int8": iter([16.0, 18.0])}

    class Core:
        def __init__(self, config):
            self.name = config.quantization
            alive.append(self.name)
            most[0] = max(most[0], len(alive))
            self.runner = SimpleNamespace(weight_bytes_per_token=len(self.name), model=self)
            self.structured = SimpleNamespace(shutdown=lambda: alive.remove(self.name))

    monkeypatch.setattr(variants, "EngineCore", Core)
    monkeypatch.setattr(variants, "chat_prompts", lambda model, texts: [[1, 2], [3, 4]])
    monkeypatch.setattr(variants, "run_to_end", lambda core, reqs: {r: [] for r in reqs})
    monkeypatch.setattr(variants, "tokens_of", lambda deltas: [5, 6])
    monkeypatch.setattr(variants, "teacher_forced_logits",
                        lambda model, ids, first: torch.zeros(2, 4))
    monkeypatch.setattr(variants, "compare", lambda ref, other: (1, 0.5))
    monkeypatch.setattr(variants, "decode_speed",
                        lambda core, prompt, tokens, repeats: next(speeds[core.name]))
    monkeypatch.setattr(variants, "batch_throughput",
                        lambda core, prompts, streams, tokens: 100.0)
    config = EngineConfig(model="m")
    out = variants.run_variants(config, ["int8", "int4"], num_prompts=2, speed_repeats=2,
                                batch_repeats=1)
    assert most[0] == 2 and alive == []
    assert list(out)[3:] == ["none", "int8", "int4"]
    # int8 beside bf16's rounds 10 and 12, int4 beside 11 and 9: each ratio to its own.
    assert out["int8"]["decode_speedup"] == round(18 / 12, 2)
    assert out["int8"]["decode_speedup_rounds"] == [1.6, 1.5]
    assert out["int4"]["decode_speedup"] == round(25 / 11, 2)
    assert out["none"]["decode_tokens_per_s_rounds"] == [10.0, 12.0, 11.0, 9.0]
    assert out["int4"]["quality"] == {"top1_agreement": 0.5, "mean_kl": 0.25, "positions": 4}
