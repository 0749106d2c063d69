from __future__ import annotations

import random

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.outputs import FinishReason
from services.worker.engine.params import Priority, SamplingParams
from services.worker.engine.request import Request, RequestStatus
from services.worker.engine.scheduler import Scheduler, SchedulerOutput


def make(num_blocks: int = 11, block_size: int = 4, budget: int = 16, max_seqs: int = 8,
         prefix: bool = True) -> Scheduler:
    bm = BlockManager(num_blocks=num_blocks, block_size=block_size, enable_prefix_caching=prefix)
    return Scheduler(block_manager=bm, max_num_seqs=max_seqs, max_num_batched_tokens=budget)


def req(rid: str, n: int, *, max_tokens: int = 4, priority: Priority = Priority.NORMAL,
        arrival: float = 0.0, start: int = 0) -> Request:
    return Request(request_id=rid, prompt_ids=list(range(start, start + n)),
                   params=SamplingParams(max_tokens=max_tokens), priority=priority,
                   arrival_time=arrival)


def run_step(s: Scheduler, token: int = 7) -> SchedulerOutput:
    """One step with a fake model: every sequence that completes samples ``token``."""
    out = s.schedule()
    for chunk in s.on_step_done(out):
        r = chunk.request
        r.append_output(token)
        if len(r.output_ids) >= r.params.max_tokens:
            s.finish(r, FinishReason.LENGTH)
    return out


def plan(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks]


def test_chunked_prefill_shares_the_budget_with_decodes():
    s = make(budget=16)
    s.add(req("a", 10, arrival=0))
    s.add(req("b", 20, arrival=1, start=100))
    assert plan(run_step(s)) == [("a", 0, 10), ("b", 0, 6)]
    # a decodes one token while b's prefill continues with the rest of the budget.
    assert plan(run_step(s)) == [("a", 10, 1), ("b", 6, 14)]
    assert plan(run_step(s)) == [("a", 11, 1), ("b", 20, 1)]


def test_new_requests_join_and_finished_ones_leave_every_step():
    s = make(budget=32)
    s.add(req("a", 4, max_tokens=2))
    assert plan(run_step(s)) == [("a", 0, 4)]
    s.add(req("b", 4, start=50, arrival=1))
    assert plan(run_step(s)) == [("a", 4, 1), ("b", 0, 4)]  # a finishes here
    assert [r.request_id for r in s.running] == ["b"]
    assert plan(run_step(s)) == [("b", 4, 1)]


def test_waiting_queue_orders_by_priority_then_arrival():
    s = make(budget=4)
    s.add(req("batch", 4, priority=Priority.BATCH, arrival=0))
    s.add(req("normal", 4, priority=Priority.NORMAL, arrival=1, start=10))
    s.add(req("chat", 4, priority=Priority.INTERACTIVE, arrival=2, start=20))
    assert plan(s.schedule()) == [("chat", 0, 4)]


def test_preemption_by_recompute_when_blocks_run_out():
    s = make(num_blocks=4, block_size=4, budget=64, prefix=False)
    s.add(req("a", 8, max_tokens=20, arrival=0))
    s.add(req("b", 8, max_tokens=20, arrival=1, start=50))
    run_step(s)  # a: blocks 0,1; b: blocks 2,3; each then samples a 9th token
    out = run_step(s)  # both need a third block: b (latest) is preempted for a
    assert [r.request_id for r in out.preempted] == ["b"]
    b = out.preempted[0]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
    assert plan(out) == [("a", 8, 1)]
    assert s.num_preemptions == 1


def test_waiting_interactive_request_preempts_running_batch_request():
    s = make(num_blocks=3, block_size=4, budget=64)
    s.add(req("batch", 9, priority=Priority.BATCH, max_tokens=20))
    run_step(s)  # holds all 3 blocks
    s.add(req("chat", 4, priority=Priority.INTERACTIVE, arrival=1, start=40))
    out = s.schedule()
    assert [r.request_id for r in out.preempted] == ["batch"]
    assert plan(out) == [("chat", 0, 4)]


def test_max_num_seqs_caps_running_requests():
    s = make(budget=64, max_seqs=2)
    for i in range(3):
        s.add(req(f"r{i}", 4, arrival=i, start=10 * i))
    assert [c.request.request_id for c in s.schedule().chunks] == ["r0", "r1"]


def test_prefix_hit_counts_cached_prompt_tokens():
    s = make(budget=64)
    s.add(req("a", 9, max_tokens=1))
    run_step(s)
    s.add(req("b", 9, max_tokens=1, arrival=1))
    out = run_step(s)
    assert plan(out) == [("b", 8, 1)]
    assert out.chunks[0].request.num_cached_prompt_tokens == 8
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (18, 8)


def test_no_block_leaks_after_300_random_requests_with_random_aborts():
    rng = random.Random(1234)
    s = make(num_blocks=40, block_size=4, budget=48, max_seqs=12)
    bm = s.blocks
    next_id = 0
    finished = 0
    while finished < 300:
        while next_id < 300 and rng.random() < 0.5:
            shared = rng.random() < 0.3  # some requests share a prefix
            n = rng.randint(1, 40)
            r = req(f"r{next_id}", n, max_tokens=rng.randint(1, 12),
                    priority=rng.choice(list(Priority)), arrival=next_id,
                    start=0 if shared else 1000 * next_id)
            s.add(r)
            next_id += 1
        live = s.running + s.waiting
        if live and rng.random() < 0.15:
            s.finish(rng.choice(live), FinishReason.ABORT)
        before = len(s.running) + len(s.waiting)
        run_step(s)
        finished += before - (len(s.running) + len(s.waiting))
        if next_id >= 300 and not s.has_work():
            break
        # Invariant: every used block is referenced by a running request.
        used = {b for r in s.running for b in bm.block_ids(r.request_id)}
        assert len(used) == bm.num_blocks - bm.num_free_blocks
    assert not s.has_work()
    assert bm.num_free_blocks == bm.num_blocks
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))
    assert s.num_preemptions > 0  # the pool was small enough to force preemption


def test_no_preemption_of_lower_classes_that_could_not_make_room():
    s = make(num_blocks=6, block_size=4, budget=64)
    s.add(req("normal", 15, priority=Priority.INTERACTIVE, max_tokens=50))
    s.add(req("batch", 7, priority=Priority.BATCH, max_tokens=50, arrival=1, start=100))
    run_step(s)  # normal: 4 blocks + batch: 2 blocks = the whole pool, room for 1 more each
    s.add(req("chat", 16, priority=Priority.INTERACTIVE, arrival=2, start=200))
    out = s.schedule()  # chat needs 4 blocks; batch frees only 2: leave it alone
    assert out.preempted == []
    assert [c.request.request_id for c in out.chunks] == ["normal", "batch"]


def test_full_sequence_slots_let_interactive_preempt_batch():
    s = make(budget=64, max_seqs=2)
    s.add(req("b1", 4, priority=Priority.BATCH, max_tokens=100))
    s.add(req("b2", 4, priority=Priority.BATCH, max_tokens=100, arrival=1, start=10))
    run_step(s)
    s.add(req("chat", 4, priority=Priority.INTERACTIVE, arrival=2, start=20))
    out = s.schedule()
    assert [r.request_id for r in out.preempted] == ["b2"]
    assert plan(out) == [("b1", 4, 1), ("chat", 0, 4)]


def test_an_online_request_behind_batch_work_gets_its_first_step_alone():
    s = make(num_blocks=40, budget=32)
    s.add(req("b1", 4, max_tokens=20, priority=Priority.BATCH))
    s.add(req("b2", 4, max_tokens=20, priority=Priority.BATCH, start=50, arrival=1))
    run_step(s)
    assert plan(run_step(s)) == [("b1", 4, 1), ("b2", 4, 1)]
    s.add(req("online", 6, priority=Priority.INTERACTIVE, start=100, arrival=2))
    assert plan(run_step(s)) == [("online", 0, 6)]  # the batch decodes sit this one out
    assert plan(run_step(s)) == [("online", 6, 1), ("b1", 5, 1), ("b2", 5, 1)]


def test_a_newcomer_that_cannot_be_admitted_does_not_stall_the_batch():
    s = make(num_blocks=4, budget=32)  # 16 tokens of KV in all
    s.add(req("b1", 8, max_tokens=20, priority=Priority.BATCH))
    run_step(s)
    s.add(req("online", 12, priority=Priority.INTERACTIVE, start=100, arrival=1))
    # Its prompt does not fit the free blocks: no urgent step, the usual rules apply (the
    # batch request is preempted to make room).
    assert s._urgent_priority() is None
    out = run_step(s)
    assert plan(out) == [("online", 0, 12)] and [r.request_id for r in out.preempted] == ["b1"]
