"""`bench serve`'s workloads and arrival schedule: seeded, exact, prefix-sharing."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest

from genmesh.bench.serve_workload import (
    SYSTEM_PROMPT,
    WorkloadSpec,
    input_lengths,
    make_workload,
    poisson_arrivals,
    turn_messages,
)


def test_poisson_arrivals_are_seeded_and_exact():
    # random.Random(7) draws u = 0.32383276..., 0.15084917..., 0.65093447...; the gaps
    # are -ln(1 - u) / 2.
    times = poisson_arrivals(4, 2.0, seed=7)
    assert times == pytest.approx([0.0, 0.195657422, 0.277416651, 0.803664460], abs=1e-9)
    assert times[1] == -math.log(1 - 0.32383276483316237) / 2.0
    assert poisson_arrivals(4, 2.0, seed=7) == times
    assert poisson_arrivals(4, 2.0, seed=8) != times


def test_poisson_gaps_average_one_over_the_rate():
    times = poisson_arrivals(20_000, 4.0, seed=0)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.03)
    assert all(g >= 0 for g in gaps)


def test_an_infinite_rate_sends_everything_at_once_and_zero_is_refused():
    assert poisson_arrivals(3, math.inf, seed=0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="positive"):
        poisson_arrivals(3, 0.0, seed=0)


def test_input_lengths_span_the_range():
    # Log-spaced: each length ~1.49x the one before (16 * 16 ** (i / 7)).
    lengths = input_lengths(8, min_words=16, max_words=256, rng=random.Random(0))
    assert sorted(lengths) == [16, 24, 35, 53, 78, 116, 172, 256]
    assert lengths != sorted(lengths)  # shuffled: long and short prompts interleave


def test_mixed_prompts_are_single_turn_distinct_and_reproducible():
    spec = WorkloadSpec("mixed", num_requests=6, min_input_words=16, max_input_words=128)
    convs = make_workload(spec, tag="L0", seed=3)
    assert len(convs) == 6 and all(len(c.user_turns) == 1 for c in convs)
    assert all(c.system_prompt == "" for c in convs)
    firsts = [c.user_turns[0].split("\n")[0] for c in convs]
    assert firsts == [f"Request L0-{i}." for i in range(6)]  # no shared first block
    assert make_workload(spec, tag="L0", seed=3) == convs
    # Another level gets other prompts (no cache of an earlier level answers them).
    assert {c.user_turns for c in make_workload(spec, tag="L1", seed=3)}.isdisjoint(
        {c.user_turns for c in convs})
    words = sorted(len(c.user_turns[0].split("\n")[1].split()) for c in convs)
    assert words[0] == 16 and words[-1] == 128


def test_chat_turns_share_the_system_prompt_and_their_history():
    spec = WorkloadSpec("chat", num_requests=7, num_turns=3)
    convs = make_workload(spec, tag="L0", seed=0)
    assert len(convs) == 2 and all(len(c.user_turns) == 3 for c in convs)  # 7 // 3
    for conv in convs:
        replies: list[str] = []
        previous: list[dict[str, str]] = []
        for k in range(3):
            messages = turn_messages(conv, replies)
            assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
            assert messages[-1] == {"role": "user", "content": conv.user_turns[k]}
            # Turn k opens with turn k-1's messages and its answer: a shared prefix.
            assert messages[:len(previous)] == previous
            assert len(messages) == 2 * k + 2
            replies.append(f"answer {k} of {conv.conversation_id}")
            previous = [*messages, {"role": "assistant", "content": replies[-1]}]
    assert convs[0].user_turns[0] != convs[1].user_turns[0]


def test_unknown_workload():
    with pytest.raises(ValueError, match="mixed, chat"):
        make_workload(WorkloadSpec("sharegpt", num_requests=1), tag="x", seed=0)
