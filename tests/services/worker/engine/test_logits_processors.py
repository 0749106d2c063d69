"""Logit bias, min-tokens, presence/frequency penalties and the grammar's token mask on
hand-made logits: exact values, rows that use no knob left as they are, and the same
number of device ops whatever the batch size."""

from __future__ import annotations

import math

import torch

from services.worker.engine.logits_processors import (
    TokenBitmask,
    bitmask_offsets,
    process_logits,
)
from services.worker.engine.sampler import Sampler
from tests.services.worker.engine.test_sampler import CPU, CountOps, req

INF = math.inf
EOS = (2,)


def bits(allowed: set[int], num_words: int) -> list[int]:
    """One token mask: int32 words, bit j of word w allowing token 32 w + j."""
    words = [0] * num_words
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]  # as signed int32


def mask(rows: list[int], allowed: list[set[int]], num_words: int = 1) -> TokenBitmask:
    return TokenBitmask(rows=rows, bits=torch.tensor([bits(a, num_words) for a in allowed],
                                                     dtype=torch.int32))


def with_output(r, output_ids: list[int]):  # type: ignore[no-untyped-def]
    for t in output_ids:
        r.append_output(t)
    return r


def test_no_knob_returns_the_logits_themselves():
    logits = torch.randn(2, 8)
    assert process_logits(logits, [req("a"), req("b", temperature=1.0)]) is logits


def test_logit_bias_adds_to_its_rows_tokens_only():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0],
                           [0.0, 0.0, 0.0, 0.0]])
    out = process_logits(logits, [req("a", logit_bias=((0, 5.0), (3, -100.0))), req("b")])
    assert out.tolist() == [[5.0, 1.0, 2.0, -97.0], [0.0, 0.0, 0.0, 0.0]]
    assert logits[0, 0] == 0.0  # the raw logits (for logprobs) are not touched


def test_a_bias_of_100_forces_and_minus_100_bans_a_token():
    logits = torch.tensor([[9.0, 1.0, 2.0, 3.0]] * 2)
    tokens, _ = Sampler(CPU).sample(logits, [req("force", logit_bias=((1, 100.0),)),
                                             req("ban", logit_bias=((0, -100.0),))])
    assert tokens == [1, 3]


def test_min_tokens_bans_the_end_and_stop_tokens_until_reached():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 4)
    batch = [
        with_output(req("short", min_tokens=3, stop_token_ids=(1,)), [3]),
        with_output(req("reached", min_tokens=3, stop_token_ids=(1,)), [3, 3, 3]),
        with_output(req("ignore_eos", min_tokens=3, ignore_eos=True, stop_token_ids=(1,)), []),
        req("free"),
    ]
    out = process_logits(logits, batch, eos_token_ids=EOS)
    assert out.tolist() == [[0.0, -INF, -INF, 3.0],
                            [0.0, 1.0, 2.0, 3.0],
                            [0.0, -INF, 2.0, 3.0],  # the model's end token is not an end here
                            [0.0, 1.0, 2.0, 3.0]]


def test_min_tokens_counts_a_placeholder_as_a_generated_token():
    r = with_output(req("p", min_tokens=2), [3])
    r.append_placeholder()  # the second token, still on the device: the third may end
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert process_logits(logits, [r], eos_token_ids=EOS).tolist() == [[0.0, 1.0, 2.0, 3.0]]


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    logits = torch.zeros(3, 5)
    batch = [
        with_output(req("both", prompt_ids=(2, 2), presence_penalty=0.5,
                        frequency_penalty=0.25), [1, 1, 3]),
        with_output(req("negative", presence_penalty=-1.0, frequency_penalty=-0.5), [4, 4]),
        with_output(req("free"), [1, 1]),
    ]
    out = process_logits(logits, batch)
    assert out.tolist() == [[0.0, -1.0, 0.0, -0.75, 0.0],  # 0.5 + 2 * 0.25; 0.5 + 0.25
                            [0.0, 0.0, 0.0, 0.0, 2.0],  # -(-1.0 + 2 * -0.5)
                            [0.0, 0.0, 0.0, 0.0, 0.0]]


def test_penalties_of_a_request_with_no_output_yet_change_nothing():
    logits = torch.zeros(1, 4)
    assert process_logits(logits, [req("a", presence_penalty=2.0)]).tolist() == [[0.0] * 4]


def test_bitmask_offsets_read_bit_j_of_word_w_as_token_32w_plus_j():
    allowed = {0, 5, 31, 32, 39}
    offsets = bitmask_offsets(torch.tensor([bits(allowed, 2)], dtype=torch.int32), 40)
    assert offsets.shape == (1, 40)
    assert [t for t in range(40) if offsets[0, t] == 0.0] == sorted(allowed)
    assert all(offsets[0, t] == -INF for t in range(40) if t not in allowed)


def test_bitmask_wider_or_narrower_than_the_logits():
    row = torch.tensor([bits({1, 63}, 2)], dtype=torch.int32)  # a 64-token mask
    padded = bitmask_offsets(row, 70)  # logits of a model whose vocabulary is padded to 70
    assert [t for t in range(70) if padded[0, t] == 0.0] == [1, 63]  # 64..69 banned
    cut = bitmask_offsets(row, 40)  # a mask wider than the logits: bits past 40 ignored
    assert cut.shape == (1, 40) and [t for t in range(40) if cut[0, t] == 0.0] == [1]


def test_the_mask_touches_the_constrained_rows_only():
    logits = torch.arange(12, dtype=torch.float32).view(3, 4)
    out = process_logits(logits, [req("free1"), req("json"), req("free2")],
                         bitmask=mask([1], [{0, 2}]))
    assert out.tolist() == [[0.0, 1.0, 2.0, 3.0],
                            [4.0, -INF, 6.0, -INF],
                            [8.0, 9.0, 10.0, 11.0]]


def test_greedy_and_sampled_constrained_rows_only_take_allowed_tokens():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0]] * 2)
    allowed = {3, 4, 6}
    sampler = Sampler(CPU)
    for seed in range(30):
        batch = [req("g"), req("s", temperature=2.0, seed=seed)]
        tokens, _ = sampler.sample(logits, batch, bitmask=mask([0, 1], [allowed, allowed]))
        assert tokens[0] == 3 and tokens[1] in allowed


def test_a_tiny_repetition_penalty_cannot_take_a_token_the_grammar_bans():
    # 1e-42 divides a positive logit to inf; inf + the mask's -inf would be NaN, and NaN
    # wins argmax. Found by the fuzzer (json_object, repetition_penalty 1.02e-42).
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]] * 2)
    allowed = {0, 2}
    batch = [req("g", prompt_ids=(1, 2), repetition_penalty=1e-42),
             req("s", prompt_ids=(1, 2), repetition_penalty=1e-42, temperature=1.0, seed=3)]
    out = process_logits(logits, batch, bitmask=mask([0, 1], [allowed, allowed]))
    assert not out.isnan().any()
    tokens, _ = Sampler(CPU).sample(logits, batch, bitmask=mask([0, 1], [allowed, allowed]))
    assert tokens[0] == 2 and tokens[1] in allowed  # 2: its logit grew to the float max


def test_the_grammar_wins_over_min_tokens_when_only_the_end_is_allowed():
    logits = torch.tensor([[0.0, 1.0, 0.5, 3.0]] * 2)
    batch = [with_output(req("done", min_tokens=5), [3]),  # its text is complete: only EOS
             with_output(req("free", min_tokens=5), [3])]
    out = process_logits(logits, batch, eos_token_ids=EOS, bitmask=mask([0], [{2}]))
    assert out.tolist() == [[-INF, -INF, 0.5, -INF], [0.0, 1.0, -INF, 3.0]]


def test_min_tokens_still_bans_the_end_where_the_grammar_allows_more():
    logits = torch.tensor([[0.0, 1.0, 9.0, 3.0]])
    batch = [with_output(req("json", min_tokens=5), [3])]
    out = process_logits(logits, batch, eos_token_ids=EOS, bitmask=mask([0], [{1, 2}]))
    assert out.tolist() == [[-INF, 1.0, -INF, -INF]]


def test_a_step_with_every_knob_runs_the_same_device_ops_for_8_rows_as_for_64():
    counts = []
    for num_rows in (8, 64):
        kinds = [dict(logit_bias=((1, 2.0), (7, -3.0))), dict(min_tokens=4),
                 dict(presence_penalty=0.4, frequency_penalty=0.2, temperature=0.7, seed=3),
                 dict(repetition_penalty=1.2)]
        batch = [with_output(req(f"r{i}", **kinds[i % 4]), list(range(i % 5)))  # type: ignore[arg-type]
                 for i in range(num_rows)]
        constrained = list(range(0, num_rows, 2))
        bitmask = mask(constrained, [set(range(0, 64, 1 + i % 3)) for i in constrained], 2)
        logits = torch.randn(num_rows, 64)
        with CountOps() as ops:
            Sampler(CPU, eos_token_ids=EOS).sample(logits, batch, bitmask=bitmask)
        counts.append(ops.counts)
    assert counts[0] == counts[1]
    assert sum(counts[0].values()) < 200
