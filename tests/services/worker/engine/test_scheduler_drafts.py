"""The scheduler's slots for speculative drafts: within the budget and what a request may
still emit, and never at the cost of another request: drafts take no token or block that
a request scheduled after them (running or admitted this step) needs, so they never
cause a preemption or keep a request out of its step."""

from __future__ import annotations

import copy
import random

import pytest

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.outputs import FinishReason
from services.worker.engine.params import Priority, SamplingParams
from services.worker.engine.request import Request
from services.worker.engine.scheduler import Scheduler, SchedulerOutput


def make(num_blocks: int, *, budget: int = 64, prefix: bool = False) -> Scheduler:
    blocks = BlockManager(num_blocks=num_blocks, block_size=4, enable_prefix_caching=prefix)
    return Scheduler(block_manager=blocks, max_num_seqs=4, max_num_batched_tokens=budget)


def req(rid: str, n: int, *, start: int = 0, max_tokens: int = 16,
        priority: Priority = Priority.NORMAL, arrival: float = 0.0) -> Request:
    return Request(request_id=rid, prompt_ids=list(range(start, start + n)),
                   params=SamplingParams(max_tokens=max_tokens), priority=priority,
                   arrival_time=arrival)


def step(s: Scheduler) -> SchedulerOutput:
    """Schedule and run a step with a fake model that samples 7 (no drafts kept)."""
    out = s.schedule()
    for chunk in s.on_step_done(out):
        chunk.request.append_output(7)
    return out


def chunks(out: SchedulerOutput) -> list[tuple[str, int, int, int]]:
    return [(c.request.request_id, c.start, c.num_tokens, c.num_lookahead) for c in out.chunks]


def test_the_scheduler_reserves_slots_for_drafts_within_budget_and_max_tokens():
    blocks = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    s = Scheduler(block_manager=blocks, max_num_seqs=4, max_num_batched_tokens=64)
    r = Request(request_id="r", prompt_ids=list(range(10, 16)),
                params=SamplingParams(max_tokens=4))
    s.add(r)
    out = s.schedule()
    s.on_step_done(out)
    r.append_output(99)  # 7 tokens, 6 computed
    r.num_lookahead = 5
    out = s.schedule()
    (chunk,) = out.chunks
    # max_tokens 4, one output so far: this step may emit 3 tokens, so 2 drafts.
    assert (chunk.start, chunk.num_tokens, chunk.num_lookahead) == (6, 1, 2)
    assert len(blocks.block_ids("r")) == 3  # positions 0..8
    s.on_step_done(out)
    assert r.num_computed_tokens == 7  # the drafts count once accepted
    r.append_output(20)
    r.append_output(21)
    s.on_drafts_accepted(r, 1)  # the draft 20 was kept; 21 is new
    assert r.num_computed_tokens == 8
    assert blocks.num_cached_blocks == 2  # positions 0..7: two full blocks hashed


@pytest.mark.parametrize(("num_blocks", "granted"), [(4, 3), (5, 4)])
def test_drafts_never_take_a_block_another_running_request_needs(num_blocks, granted):
    """Two requests of one full block each decode: each needs a new block. Three drafts
    of the first fit in its new block; a fourth needs another, left only when the
    second request's block is (4 blocks: three drafts; 5: four)."""
    s = make(num_blocks)
    for rid in ("a", "b"):
        s.add(req(rid, 4))
    step(s)
    s.running[0].num_lookahead = 4
    out = s.schedule()
    assert not out.preempted
    assert chunks(out) == [("a", 4, 1, granted), ("b", 4, 1, 0)]


def test_a_decode_behind_with_room_in_its_block_leaves_the_free_block_to_drafts():
    """b's next token fits its last block: a's drafts may take the one free block (the
    guard once kept a block for every running request behind)."""
    s = make(4)  # a: 1 block, b: 2 blocks (5 tokens), 1 free
    s.add(req("a", 4))
    s.add(req("b", 5, start=50, arrival=1))
    step(s)
    s.running[0].num_lookahead = 3
    out = s.schedule()
    assert chunks(out) == [("a", 4, 1, 3), ("b", 5, 1, 0)]
    assert not out.preempted and s.blocks.num_free_blocks == 0


@pytest.mark.parametrize(("num_blocks", "granted"), [(7, 3), (8, 4)])
def test_drafts_leave_a_prefill_behind_them_the_blocks_of_its_chunk(num_blocks, granted):
    """a decodes; p's prefill behind it has 8 tokens left, two blocks. With 3 blocks
    free, a's drafts get the one p leaves (three drafts; four would take a block of p's
    and preempt it); with 4 free, four drafts."""
    s = make(num_blocks, budget=16)
    s.add(req("a", 4))
    s.add(req("p", 20, start=50, arrival=1))
    step(s)  # a: 4 tokens, 1 block; p: 12 of its 20, 3 blocks
    s.running[0].num_lookahead = 4
    out = s.schedule()
    assert chunks(out) == [("a", 4, 1, granted), ("p", 12, 8, 0)]
    assert not out.preempted and s.num_preemptions == 0
    assert s.blocks.num_free_blocks == 0


def test_drafts_leave_a_waiting_request_the_blocks_of_its_admission():
    """w (two blocks) arrives while a decodes with 3 blocks free: a's drafts get the one
    block w leaves, and w is admitted. Four drafts would take two, and w would wait."""
    s = make(4)
    s.add(req("a", 4))
    step(s)
    s.add(req("w", 8, start=50, arrival=1))
    s.running[0].num_lookahead = 4
    out = s.schedule()
    assert chunks(out) == [("a", 4, 1, 3), ("w", 0, 8, 0)]
    assert not out.preempted and s.waiting == []
    assert s.blocks.num_free_blocks == 0


def test_drafts_count_a_waiting_requests_cached_prefix_as_blocks_it_takes():
    """w's first 8 tokens are cached in two free blocks: admitting it takes them and
    one new block, 3 of the 4 free. a's drafts get the fourth: four drafts, not eight
    (which would take two blocks and keep w out)."""
    s = make(5, prefix=True)
    s.add(req("c", 9, max_tokens=1))
    step(s)
    s.finish(s.running[0], FinishReason.LENGTH)  # its 2 full blocks stay cached, free
    s.add(req("a", 3, start=50, arrival=1))
    step(s)  # a: 1 block, 3 tokens, its decode at position 3; free: 4 (2 cached)
    s.add(req("w", 10, arrival=2))
    s.running[0].num_lookahead = 8
    out = s.schedule()
    # w takes 2 cached + 1 new block; 1 is left for a's drafts: 4 slots after its own.
    assert chunks(out) == [("a", 3, 1, 4), ("w", 8, 2, 0)]
    assert s.blocks.num_free_blocks == 0


def test_a_waiting_request_that_cannot_be_admitted_anyway_leaves_drafts_alone():
    s = make(4)  # a: 1 block, 3 free; w needs 5
    s.add(req("a", 4))
    step(s)
    s.add(req("w", 20, start=50, arrival=1))
    s.running[0].num_lookahead = 4
    out = s.schedule()
    assert chunks(out) == [("a", 4, 1, 4)]
    assert s.waiting[0].request_id == "w" and not out.preempted


def test_drafts_get_the_budget_the_step_leaves():
    """Budget 8: a's eight drafts would leave b's decode and w's prompt none. They get
    the two tokens left once b decodes and w's whole prompt is in."""
    s = make(16, budget=8)
    s.add(req("a", 4))
    s.add(req("b", 4, start=50, arrival=1))
    step(s)
    s.add(req("w", 4, start=100, arrival=2))
    s.running[0].num_lookahead = 8
    out = s.schedule()
    assert chunks(out) == [("a", 4, 1, 2), ("b", 4, 1, 0), ("w", 0, 4, 0)]


def test_drafts_change_no_step_but_their_own_reservations():
    """Random traffic of all classes with random aborts, drafts asked for every decode
    and a random number of them kept: each step schedules the chunks and preemptions
    that the same state schedules without drafts, and the pool ends free."""
    rng = random.Random(7)
    s = Scheduler(block_manager=BlockManager(num_blocks=14, block_size=4,
                                             enable_prefix_caching=True),
                  max_num_seqs=6, max_num_batched_tokens=24)
    num_granted = 0
    for i in range(2000):
        if i >= 150 and not s.has_work():
            break
        if i < 150 and rng.random() < 0.4:
            s.add(req(f"r{i}", rng.randint(1, 20), start=0 if rng.random() < 0.3 else 100 * i,
                      max_tokens=rng.randint(1, 20), priority=rng.choice(list(Priority)),
                      arrival=i))
        live = s.running + s.waiting
        if live and rng.random() < 0.1:
            s.finish(rng.choice(live), FinishReason.ABORT)
        for r in s.running:
            r.num_lookahead = rng.randint(0, 6)
        plain = copy.deepcopy(s)
        for r in plain.running:
            r.num_lookahead = 0
        want, out = plain.schedule(), s.schedule()
        assert [(rid, start, n) for rid, start, n, _ in chunks(out)] == [
            (rid, start, n) for rid, start, n, _ in chunks(want)]
        assert [r.request_id for r in out.preempted] == [r.request_id for r in want.preempted]
        for chunk in s.on_step_done(out):
            r = chunk.request
            kept = rng.randint(0, chunk.num_lookahead)
            num_granted += chunk.num_lookahead
            for _ in range(kept + 1):
                r.append_output(7)
            s.on_drafts_accepted(r, kept)
            if len(r.output_ids) >= r.params.max_tokens:
                s.finish(r, FinishReason.LENGTH)
    assert not s.has_work() and num_granted > 0 and s.num_preemptions > 0
    assert s.blocks.num_free_blocks == s.blocks.num_blocks
