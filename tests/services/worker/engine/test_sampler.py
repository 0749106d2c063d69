"""Sampler on hand-made logits: greedy, filters, seeded draws, penalties and logprobs."""

from __future__ import annotations

from collections import Counter

import torch
from transformers import RepetitionPenaltyLogitsProcessor

from services.worker.engine.params import SamplingParams
from services.worker.engine.request import Request
from services.worker.engine.sampler import Sampler, apply_repetition_penalty

CPU = torch.device("cpu")


def req(rid: str, prompt_ids: tuple[int, ...] = (0,), **params: object) -> Request:
    return Request(request_id=rid, prompt_ids=list(prompt_ids),
                   params=SamplingParams(**params))  # type: ignore[arg-type]


def draw(logits: list[float], num_draws: int, **params: object) -> list[int]:
    """One token per seed 0..num_draws-1, each from a fresh request and Sampler."""
    row = torch.tensor([logits])
    return [Sampler(CPU).sample(row, [req("r", seed=seed, **params)])[0][0]
            for seed in range(num_draws)]


def sequence(sampler: Sampler, rows: torch.Tensor, requests: list[Request], row: int,
             num_steps: int) -> list[int]:
    """The tokens requests[row] gets over num_steps steps of the same logits."""
    return [sampler.sample(rows, requests)[0][row] for _ in range(num_steps)]


def test_greedy_takes_the_argmax_of_every_row():
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5],
                           [3.0, 2.9, 0.0, -5.0],
                           [-2.0, -1.0, -3.0, -0.5]])
    tokens, logprobs = Sampler(CPU).sample(logits, [req("a"), req("b"), req("c")])
    assert tokens == [1, 0, 3]
    assert logprobs == [None, None, None]


def test_a_tiny_temperature_still_picks_the_argmax():
    # 5 / 1e-40 overflows to inf; softmax of that used to be NaN and argmax token 0.
    assert set(draw([1.0, -2.0, 5.0, 0.5], 20, temperature=1e-40)) == {2}


def test_greedy_and_sampled_rows_share_a_batch():
    flat = [0.0] * 8
    logits = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           flat,
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 7.0]])
    batch = [req("g1"), req("s", temperature=1.0, seed=11), req("g2")]
    tokens, _ = Sampler(CPU).sample(logits, batch)
    alone, _ = Sampler(CPU).sample(logits[1:2], [req("s", temperature=1.0, seed=11)])
    assert tokens == [2, alone[0], 7]


def test_top_k_1_always_picks_the_argmax():
    assert set(draw([1.0, 1.5, 1.4, -1.0], 50, temperature=2.0, top_k=1)) == {1}


def test_tiny_top_p_always_picks_the_argmax():
    assert set(draw([1.0, 1.5, 1.4, -1.0], 50, temperature=2.0, top_p=1e-6)) == {1}


def test_top_k_keeps_only_the_k_most_likely():
    assert set(draw([3.0, 0.0, 2.9, 2.8, -1.0], 200, temperature=1.0, top_k=2)) == {0, 2}


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability():
    # p = 0.5, 0.3, 0.15, 0.05; min_p 0.5 keeps p >= 0.25.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert set(draw(probs.log().tolist(), 300, temperature=1.0, min_p=0.5)) == {0, 1}


def test_temperature_draws_follow_the_softmax():
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log()
    num_draws = 4000
    for temperature in (1.0, 0.5):
        expected = torch.softmax(logits / temperature, dim=-1).tolist()
        r = req("r", temperature=temperature, seed=1234)
        counts = Counter(sequence(Sampler(CPU), logits.unsqueeze(0), [r], 0, num_draws))
        freqs = [counts[t] / num_draws for t in range(4)]
        # 4 sigma of a binomial frequency at n = 4000 is below 0.032.
        assert max(abs(f - e) for f, e in zip(freqs, expected, strict=True)) < 0.032


def test_a_seed_gives_the_same_sequence_whatever_shares_the_batch():
    flat = torch.zeros(1, 50)
    alone = sequence(Sampler(CPU), flat, [req("x", temperature=1.0, seed=7)], 0, 20)
    crowd = [req("g"), req("other", temperature=0.5, top_k=3, seed=8),
             req("x", temperature=1.0, seed=7), req("nondet", temperature=1.0)]
    crowded = sequence(Sampler(CPU), flat.expand(4, 50), crowd, 2, 20)
    assert crowded == alone


def test_different_seeds_give_different_sequences():
    flat = torch.zeros(1, 50)
    first = sequence(Sampler(CPU), flat, [req("a", temperature=1.0, seed=1)], 0, 10)
    second = sequence(Sampler(CPU), flat, [req("a", temperature=1.0, seed=2)], 0, 10)
    assert first != second


def test_release_restarts_the_seeded_sequence():
    flat = torch.zeros(1, 50)
    sampler = Sampler(CPU)
    r = req("a", temperature=1.0, seed=5)
    first = sequence(sampler, flat, [r], 0, 5)
    sampler.release("a")
    assert sequence(sampler, flat, [r], 0, 5) == first


def test_repetition_penalty_matches_transformers():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 40, generator=gen) * 3
    seen = [3, 7, 7, 12, 30, 39, 0]
    for penalty in (1.3, 0.8):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([seen]),
                                                             logits.clone())
        ours = logits.clone()
        apply_repetition_penalty(ours[0], seen, penalty)
        assert torch.allclose(ours, expected, rtol=0, atol=0)
        assert (ours[0, seen] != logits[0, seen]).all()


def test_repetition_penalty_steers_greedy_away_from_seen_tokens():
    logits = torch.tensor([[3.0, 2.9, -1.0, -1.05]])
    assert Sampler(CPU).sample(logits, [req("a", prompt_ids=(0,))])[0] == [0]
    penalized = req("b", prompt_ids=(0,), repetition_penalty=1.2)
    assert Sampler(CPU).sample(logits, [penalized])[0] == [1]  # 3.0 / 1.2 < 2.9
    # A negative logit is multiplied: -1.0 * 1.2 falls below -1.05.
    low = torch.tensor([[-1.0, -1.05]])
    assert Sampler(CPU).sample(low, [req("c", prompt_ids=(0,), repetition_penalty=1.2)])[0] == [1]


def test_logprobs_are_the_raw_log_softmax_top_n_and_the_chosen_token():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 30, generator=gen)
    batch = [req("g", logprobs=5), req("s", temperature=1.0, top_k=3, seed=9, logprobs=3,
                                      repetition_penalty=1.5, prompt_ids=(1, 2))]
    tokens, logprobs = Sampler(CPU).sample(logits, batch)
    raw = torch.log_softmax(logits, dim=-1)
    for i, (n, lp) in enumerate(zip((5, 3), logprobs, strict=True)):
        assert lp is not None
        top = raw[i].topk(n)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == top.values.tolist()
        assert lp.token_id == tokens[i]
        assert lp.logprob == raw[i, tokens[i]].item()


def test_logprobs_only_for_rows_that_ask():
    logits = torch.zeros(2, 10)
    _, logprobs = Sampler(CPU).sample(logits, [req("a"), req("b", logprobs=2)])
    assert logprobs[0] is None
    assert logprobs[1] is not None and len(logprobs[1].top) == 2
