"""Speculative decoding: proposers, the back-off policy, verification, and the engine
end to end (greedy output identical to plain decoding, exact KV accounting)."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch

from services.worker.engine.config import EngineConfig
from services.worker.engine.input_batch import InputBatch
from services.worker.engine.model import cpu_kernels
from services.worker.engine.params import SamplingParams
from services.worker.engine.request import Request
from services.worker.engine.sampler import Sampler
from services.worker.engine.scheduler import ScheduledChunk
from services.worker.engine.speculative import (
    PROBE_EVERY,
    Match,
    NgramProposer,
    Speculation,
    StepCosts,
    best_num_drafts,
    match_kind,
)
from tests.services.worker.engine.helpers import run_core, tiny_core

CPU = torch.device("cpu")


# -- n-gram lookup -------------------------------------------------------------------

@pytest.mark.parametrize(("ids", "k", "drafts"), [
    # The longest suffix (3 tokens) recurs twice: the latest occurrence wins.
    ([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2, (7, 8)),
    # [1, 6, 7] never recurs; [6, 7] does.
    ([5, 6, 7, 1, 6, 7], 2, (1, 6)),
    # The continuation may run into the suffix itself.
    ([4, 5, 6, 4, 5], 3, (6, 4, 5)),
    # Fewer tokens follow the match than asked for.
    ([4, 5, 6, 4, 5], 9, (6, 4, 5)),
    ([1, 2, 3, 4], 3, ()),  # nothing recurs
    ([1, 2, 1, 2], 0, ()),  # no drafts asked for
    ([7, 7], 2, ()),  # shorter than a suffix plus a match
])
def test_ngram_lookup(ids, k, drafts):
    assert NgramProposer(min_n=2, max_n=3).lookup(ids, k) == drafts


def test_ngram_lookup_with_unigrams():
    assert NgramProposer(min_n=1, max_n=3).lookup([3, 8, 1, 5, 8], 2) == (1, 5)


def test_a_match_says_how_long_it_is_and_whether_earlier_occurrences_disagree():
    proposer = NgramProposer(min_n=1, max_n=6)
    # [1, 2] recurs twice, followed by 3 and by 4: the latest (4) wins, ambiguously.
    assert proposer.match([1, 2, 3, 1, 2, 4, 9, 1, 2], 2) == Match((4, 9), 2, True)
    # [1, 2, 3] recurs twice, followed by 7 both times.
    assert proposer.match([1, 2, 3, 7, 1, 2, 3, 7, 5, 1, 2, 3], 3) == Match((7, 5, 1), 3, False)
    assert proposer.match([1, 2, 3], 3) is None
    assert [match_kind(Match((), n, amb)) for n, amb in [(1, True), (2, False), (5, False),
                                                         (6, False), (9, True)]] == [
        ("ngram", 1, True, True), ("ngram", 2, False, True), ("ngram", 3, False, True),
        ("ngram", 6, False, True), ("ngram", 6, True, True)]
    assert match_kind(Match((), 4, False), greedy=False) == ("ngram", 3, False, False)


# -- the back-off policy -------------------------------------------------------------

def linear_costs(row_cost: float, max_drafts: int) -> list[float]:
    """``1 + row_cost * k`` for k = 0..max_drafts."""
    return [1.0 + row_cost * k for k in range(max_drafts + 1)]


def test_best_num_drafts():
    assert best_num_drafts(0.1, 0.1, linear_costs(0.1, 8)) == 0  # nothing pays for its rows
    assert best_num_drafts(1.0, 1.0, linear_costs(0.1, 8)) == 8
    # tokens(k) = 1 + 0.7 (1 - 0.9^k) / 0.1 over 1 + 0.3 k peaks at k = 4 (1.549).
    assert best_num_drafts(0.7, 0.9, linear_costs(0.3, 8)) == 4
    assert best_num_drafts(0.7, 0.9, linear_costs(0.1, 8)) == 8
    # Rows nearly free up to 3 drafts, dear past them (as measured on a CPU): 3 drafts
    # (2.71 tokens for 1.1) beat 8 (4.4 for 2.0).
    cpu = [1.0, 1.01, 1.05, 1.1, 1.5, 1.6, 1.7, 1.8, 2.0]
    assert best_num_drafts(0.6, 0.9, cpu) == 3
    assert best_num_drafts(0.2, 0.4, cpu) == 2  # 1.28 tokens for 1.05: even weak guesses


def test_until_a_second_draft_is_tried_next_is_at_least_first():
    from services.worker.engine.speculative import _Acceptance

    acc = _Acceptance()
    for _ in range(10):  # one draft a step, always kept
        acc.observe(1, 1)
    first, next_ = acc.rates()
    assert first > 0.95 and next_ == first  # not the prior's 0.8
    acc.observe(2, 1)  # a second draft tried after a kept first, and refused
    assert acc.rates()[1] == pytest.approx((1.6 * 0.9 ** 11) / (2.0 * 0.9 ** 11 + 1))


def test_step_costs_start_from_the_prior_and_follow_the_steps_seen():
    costs = StepCosts(0.1)
    assert costs.curve(1, 3) == pytest.approx([1.0, 1.1, 1.2, 1.3])  # the prior
    costs.record(1, 3, 0.030)  # drafts before any plain step: nothing to compare with
    assert costs.ratio(1, 3) == pytest.approx(1.3)
    costs.record(1, 0, 0.010)
    for _ in range(40):
        costs.record(1, 3, 0.011)  # 3 drafts cost 1.1 plain steps
        costs.record(1, 2, 0.009)  # the machine's noise: "cheaper" than plain
    assert costs.ratio(1, 3) == pytest.approx(1.1, abs=0.02)  # the prior all but gone
    assert costs.ratio(1, 2) < 1.0
    assert costs.curve(1, 3) == pytest.approx([1.0, 1.1, 1.1, costs.ratio(1, 3)])
    assert costs.ratio(2, 3) == pytest.approx(1.3)  # another batch size: its own prior
    costs.record(1, 5, 1.0)  # a step 100x a plain one (the machine stalled): clipped
    assert costs.ratio(1, 5) == pytest.approx((1.5 + 3 * 1.5) / 2)


def test_releasing_a_request_forgets_its_match_and_its_own_estimates():
    proposer = NgramProposer(min_n=1, max_n=6)
    spec = speculation(proposer)
    req = copying_req("r", [1, 2, 3, 1, 2])
    spec.plan([req])
    assert req.num_lookahead > 0 and "r" in proposer._last
    req.append_placeholder()  # async: its last token still on the device ...
    req.num_computed_tokens = req.num_tokens - 1
    spec.plan([req])  # ... so judged by its own past, under its id
    assert "r" in spec._acceptance
    spec.release("r")
    assert "r" not in proposer._last and "r" not in spec._acceptance
    assert "r" not in spec._states


def spec_req(rid: str, **params: object) -> Request:
    req = Request(request_id=rid, prompt_ids=[1, 2, 3],
                  params=SamplingParams(**params))  # type: ignore[arg-type]
    req.num_computed_tokens = 3  # its prompt; its next step decodes the output 4
    req.append_output(4)
    return req


class _OwnKind(NgramProposer):
    """Judges every request's drafts by its own past (as a draft model's are)."""

    def kind(self, req: Request) -> str:
        return req.request_id

    def available(self, req: Request) -> int:
        return 8


def speculation(proposer: NgramProposer | None = None, **overrides: object) -> Speculation:
    options: dict[str, object] = {"model": "tiny-llama", "load_format": "dummy",
                                  "speculative": "ngram", "speculative_max_batch": 3}
    options.update(overrides)
    config = EngineConfig(**options)  # type: ignore[arg-type]
    return Speculation(config, proposer or _OwnKind(min_n=2, max_n=4), device_type="cpu",
                       max_model_len=1000)


def copying_req(rid: str, ids: list[int]) -> Request:
    """A request whose prompt is ``ids`` and whose next step decodes after it."""
    req = Request(request_id=rid, prompt_ids=ids[:-1], params=SamplingParams())
    req.num_computed_tokens = len(ids) - 1
    req.append_output(ids[-1])
    return req


def test_ngram_drafts_share_estimates_by_kind_and_nothing_to_propose_reserves_nothing():
    spec = speculation(NgramProposer(min_n=1, max_n=6))
    text = list(range(10, 30))
    long_a = copying_req("a", text + text[:7])  # its last 6 tokens recur, unambiguously
    long_b = copying_req("b", text + text[:9])
    fresh = copying_req("c", list(range(40, 50)))  # nothing recurs
    spec.plan([long_a, long_b, fresh])
    # The prior (first draft 0.7, each next 0.8) at 0.1 a row, in a step of 3 whose
    # tokens each draft slows: 3 and 3 (a's 3 rows already in the step b's are added to).
    assert [r.num_lookahead for r in (long_a, long_b, fresh)] == [3, 3, 0]
    for _ in range(8):  # a's drafts of this kind keep failing ...
        spec.observe(long_a, 6, 0)
    spec.plan([long_a, long_b, fresh])
    # ... and b's, of the same kind, are judged by them (probes come later).
    assert [r.num_lookahead for r in (long_a, long_b, fresh)] == [0, 0, 0]
    short = copying_req("d", [5, 1, 2, 3, 9, 2])  # a match of 1, one continuation: its own kind
    spec.plan([short])
    assert short.num_lookahead == 3  # alone the prior peaks at 6; 3 drafts are there
    chunk = ScheduledChunk(short, 5, 1, num_lookahead=6)
    (proposed,) = spec.propose([chunk])
    assert proposed.spec_ids == (3, 9, 2)  # what followed the earlier 2


def test_plan_skips_large_batches_opted_out_requests_and_those_reading_their_output():
    spec = speculation()
    plain = spec_req("plain")
    out = spec_req("out", speculative=False)
    penalized = spec_req("pen", repetition_penalty=1.2)
    short = spec_req("short", min_tokens=5)
    spec.plan([plain, out, penalized])
    # The prior (first draft 0.7, each next 0.8) at 0.1 a row: (3 + kept drafts) over
    # the step's cost peaks at 3 drafts in a step of 3 requests, 4 in one of 2, 6 alone.
    assert [r.num_lookahead for r in (plain, out, penalized)] == [3, 0, 0]
    spec.plan([plain, short])
    assert [r.num_lookahead for r in (plain, short)] == [4, 0]
    spec.plan([plain])
    assert plain.num_lookahead == 6
    spec.plan([plain, out, penalized, short])  # 4 running > speculative_max_batch 3
    assert plain.num_lookahead == 0
    off = speculation(speculative_by_default=False)
    on = spec_req("on", speculative=True)
    off.plan([plain, on])
    assert [r.num_lookahead for r in (plain, on)] == [0, 4]


def test_plan_reserves_nothing_a_step_could_not_use():
    """No drafts for a request still in its prompt, computing it again after a
    preemption, or at its last token: the scheduler would refuse them."""
    spec = speculation(speculative_max_batch=4)
    prefilling = Request(request_id="p", prompt_ids=[1, 2, 3], params=SamplingParams())
    recomputing = spec_req("re")
    recomputing.num_computed_tokens = 0
    last = spec_req("last", max_tokens=2)  # one output; the next token is its last
    decoding = spec_req("d")
    spec.plan([prefilling, recomputing, last, decoding])
    # (3: the prior in a step of 4, test_plan_skips_large_batches...)
    assert [r.num_lookahead for r in (prefilling, recomputing, last, decoding)] == [0, 0, 0, 3]


def test_low_acceptance_backs_off_then_probes_with_one_draft():
    spec = speculation()
    req = spec_req("r")
    for _ in range(6):  # six verifications that kept nothing
        spec.observe(req, 8, 0)
    looks = []
    for _ in range(PROBE_EVERY):
        spec.plan([req])
        looks.append(req.num_lookahead)
    assert looks == [0] * (PROBE_EVERY - 1) + [1]
    for _ in range(8):  # the text turned repetitive: every draft accepted
        spec.observe(req, 8, 8)
    spec.plan([req])
    assert req.num_lookahead == 8
    s = spec.stats
    assert (s.proposed_tokens, s.accepted_tokens, s.verifications, s.emitted_tokens) == (
        112, 64, 14, 78)
    assert s.accepted_histogram == [6, 0, 0, 0, 0, 0, 0, 0, 8]


def test_a_request_whose_drafts_the_scheduler_refuses_backs_off():
    """Each refusal in a row doubles the plans skipped after it (1, 2, 4, 8, 16, then
    PROBE_EVERY); a granted reservation ends the back-off. The acceptance estimates are
    left alone: each plan asks for the prior's 6."""
    spec = speculation()
    req = spec_req("r")
    looks = []
    for _ in range(54):
        spec.plan([req])
        looks.append(req.num_lookahead)
        spec.propose([ScheduledChunk(req, 4, 1)])  # the scheduler granted no slot
    assert [i for i, k in enumerate(looks) if k] == [0, 2, 5, 10, 19, 36, 53]
    assert set(looks) == {0, 6}
    spec.propose([ScheduledChunk(req, 4, 1, num_lookahead=2)])  # granted (no match)
    for _ in range(3):
        spec.plan([req])
        assert req.num_lookahead == 6
        spec.propose([ScheduledChunk(req, 4, 1, num_lookahead=6)])
    assert spec.stats.verifications == 0


class _ModelProposer(_OwnKind):
    has_model = True


def test_a_draft_model_nearly_as_slow_as_the_model_is_not_used_or_probed():
    config = EngineConfig(model="tiny-llama", load_format="dummy", speculative="ngram")
    spec = Speculation(config, _ModelProposer(min_n=2, max_n=4), device_type="cpu",
                       max_model_len=1000)
    req = spec_req("r")
    spec.plan([req])
    assert req.num_lookahead > 0  # the prior: a draft step costs half a plain one
    # Measured: a draft step costs 0.9 of a plain one, and every draft is accepted.
    spec.record_proposal(0.9, 1)
    spec.record_step(1, 0, 1.0)
    spec.observe(req, 4, 4)
    assert not spec.can_pay()
    looks = set()
    for _ in range(3 * PROBE_EVERY):
        spec.plan([req])
        looks.add(req.num_lookahead)
    assert looks == {0}


def test_a_draft_model_follows_prefills_only_outside_large_batches():
    """Nobody speculates in a large batch, so its prompts are not computed by the draft
    (a 64-stream run once went at 0.63x plain decoding's throughput doing so)."""
    followed: list[list[str]] = []

    class Following(_ModelProposer):
        def follow(self, chunks):
            followed.append([c.request.request_id for c in chunks])

    spec = speculation(Following(min_n=2, max_n=4), speculative_max_batch=2)
    prompts = [Request(request_id=f"p{i}", prompt_ids=[1, 2, 3], params=SamplingParams())
               for i in range(3)]
    spec.plan([])
    spec.propose([ScheduledChunk(p, 0, 3) for p in prompts])  # 3 prefills > 2
    spec.propose([ScheduledChunk(p, 0, 3) for p in prompts[:2]])
    spec.plan(prompts)  # 3 running
    spec.propose([ScheduledChunk(prompts[0], 0, 3)])
    assert followed == [["p0", "p1"]]


# -- step inputs (the scheduler's draft slots: test_scheduler_drafts.py) ---------------

def test_the_draft_models_kv_is_inside_the_pools_memory():
    from services.worker.engine.model.config import PRESETS
    from services.worker.engine.sizing import num_kv_blocks

    cfg = PRESETS["tiny-llama"]
    config = EngineConfig(model="tiny-llama", dtype="float32", block_size=4,
                          kv_cache_memory_gib=0.01)
    alone = num_kv_blocks(config, cfg)
    assert num_kv_blocks(config, cfg, cfg) == alone // 2  # a draft of the same shape
    core = tiny_core(speculative="draft", speculative_draft_model="tiny-llama",
                     num_kv_blocks=None, kv_cache_memory_gib=0.01)
    assert core.blocks.num_blocks == alone // 2


def test_a_chunk_with_drafts_is_one_decode_row_per_token():
    batch = InputBatch(max_num_seqs=4, max_blocks_per_seq=8, max_num_tokens=64,
                       block_size=4, device=CPU, decode_kernel=True, varlen_prefill=False)
    req = Request(request_id="r", prompt_ids=[11, 12, 13, 14, 15, 16],
                  params=SamplingParams())
    other = Request(request_id="o", prompt_ids=[21, 22, 23], params=SamplingParams())
    chunks = [ScheduledChunk(req, 5, 1, num_lookahead=3, spec_ids=(7, 8)),
              ScheduledChunk(other, 2, 1)]
    inputs = batch.prepare(chunks, [[3, 9], [5]])
    # Decode rows sorted by context: other (3), then r's three positions (6, 7, 8).
    assert inputs.input_ids.tolist() == [23, 16, 7, 8]
    assert inputs.positions.tolist() == [2, 5, 6, 7]
    assert inputs.meta.slot_mapping.tolist() == [22, 37, 38, 39]
    (group,) = inputs.meta.decode_groups
    assert group.ctx_lens.tolist() == [3, 6, 7, 8]
    assert group.block_table.tolist() == [[5, 0], [3, 9], [3, 9], [3, 9]]
    assert inputs.logits_indices.tolist() == [1, 2, 3, 0]  # r's rows, then other's
    assert inputs.meta.row_exact and inputs.num_decodes == 4
    # A draft model feeding its own draft: one row, logits after it.
    batch.release("r")
    draft = batch.prepare([ScheduledChunk(req, 6, 0, spec_ids=(7,))], [[3, 9]],
                          verify_drafts=False)
    assert draft.input_ids.tolist() == [7]
    assert draft.positions.tolist() == [6]
    assert draft.logits_indices.tolist() == [0]
    assert not draft.meta.row_exact


# -- verification --------------------------------------------------------------------

def test_greedy_verification_accepts_drafts_that_are_the_argmax():
    sampler = Sampler(CPU)
    logits = torch.full((5, 10), -5.0)
    for row, best in enumerate([2, 5, 7, 1, 4]):
        logits[row, best] = 5.0
    a, b = spec_req("a"), spec_req("b")
    sampled = sampler.launch_verify(logits, [a, b], [(2, 3), (1,)])
    tokens, logprobs, accepted = sampled.read_verified()
    assert tokens == [2, 5, 7, 1, 4]
    assert accepted == [True, False, False, True, False]
    assert logprobs == [None] * 5


def test_rejection_sampling_keeps_the_model_distribution():
    # p over 4 tokens; the draft proposes token 1 (p = 0.3) whatever happens.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().unsqueeze(0).repeat(2, 1)  # the draft's row, then the bonus row
    sampler = Sampler(CPU)
    n = 6000
    counts = [0] * 4
    accepted_count = 0
    for seed in range(n):
        req = spec_req(f"r{seed}", temperature=1.0, seed=seed)
        tokens, _, accepted = sampler.launch_verify(logits, [req], [(1,)]).read_verified()
        counts[tokens[0]] += 1  # the first emitted token: the draft or its replacement
        accepted_count += accepted[0]
        assert accepted[0] == (tokens[0] == 1)
    for token, p in enumerate(probs.tolist()):
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(counts[token] / n - p) < 4 * sigma, (token, counts)
    assert abs(accepted_count / n - 0.3) < 4 * math.sqrt(0.21 / n)


def test_row_j_of_a_verification_is_draw_number_n_plus_j():
    # Rows without a draft to check (-1) are plain draws; their counters follow the rows.
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(CPU)
    for seed in range(20):
        req = spec_req(f"r{seed}", temperature=0.9, top_p=0.9, seed=seed)
        want = []
        for j in range(3):
            want.append(sampler.launch(logits[j:j + 1], [req]).read()[0][0])
            req.output_ids.append(0)
        del req.output_ids[-3:]
        tokens, _, accepted = sampler.launch_verify(logits, [req], [(-1, -1)]).read_verified()
        assert tokens == want and accepted == [False] * 3


# -- the engine ----------------------------------------------------------------------

def repetitive_prompts(rng: random.Random, n: int) -> list[list[int]]:
    """Prompts that repeat a phrase, so that n-gram lookup proposes drafts."""
    out = []
    for _ in range(n):
        phrase = [rng.randrange(3, 500) for _ in range(rng.randint(3, 8))]
        out.append([rng.randrange(3, 500) for _ in range(rng.randint(1, 6))]
                   + phrase * rng.randint(2, 5))
    return out


def outputs(core, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    out = run_core(core, {f"r{i}": (p, params) for i, p in enumerate(prompts)})
    return [[t for d in out[f"r{i}"] for t in d.new_token_ids] for i in range(len(prompts))]


@pytest.mark.parametrize("mode", ["ngram", "draft"])
def test_greedy_speculation_returns_what_plain_decoding_returns(mode):
    prompts = repetitive_prompts(random.Random(3), 6)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = tiny_core(num_kv_blocks=256)
    draft = {"speculative_draft_model": "tiny-llama"} if mode == "draft" else {}
    spec = tiny_core(num_kv_blocks=256, speculative=mode, speculative_max_batch=8, **draft)
    want = [outputs(plain, [p], params)[0] for p in prompts]
    assert [outputs(spec, [p], params)[0] for p in prompts] == want  # one at a time
    assert outputs(spec, prompts, params) == want  # all at once
    stats = spec.stats()
    assert stats.spec_proposed_tokens > 0 and stats.spec_verifications > 0
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total
    if mode == "draft":  # the draft is the model itself: it guesses right
        assert stats.spec_acceptance_rate >= 0.9


def test_a_stop_token_among_accepted_drafts_ends_the_output_there():
    prompt = repetitive_prompts(random.Random(5), 1)[0]
    plain = tiny_core(num_kv_blocks=256)
    free = outputs(plain, [prompt], SamplingParams(max_tokens=24, ignore_eos=True))[0]
    stop = free[10]
    params = SamplingParams(max_tokens=24, ignore_eos=True, stop_token_ids=(stop,))
    want = outputs(plain, [prompt], params)[0]
    spec = tiny_core(num_kv_blocks=256, speculative="draft",
                     speculative_draft_model="tiny-llama")
    got = run_core(spec, {"r": (prompt, params)})["r"]
    assert [t for d in got for t in d.new_token_ids] == want
    assert want[-1] == stop and len(want) <= 11
    assert got[-1].usage is not None and got[-1].usage.completion_tokens == len(want)


def test_sampled_speculation_gives_plain_seeded_tokens_lengths_and_logprobs():
    prompts = repetitive_prompts(random.Random(9), 4)
    params = SamplingParams(max_tokens=17, ignore_eos=True, temperature=0.7, seed=4,
                            logprobs=2)

    def run() -> dict[str, list]:
        spec = tiny_core(num_kv_blocks=256, speculative="draft",
                         speculative_draft_model="tiny-llama")
        return run_core(spec, {f"r{i}": (p, params) for i, p in enumerate(prompts)})

    first, second = run(), run()
    plain = run_core(tiny_core(num_kv_blocks=256),
                     {f"r{i}": (p, params) for i, p in enumerate(prompts)})
    for rid, deltas in first.items():
        # The seed fixes the output, speculating or not (a draft is kept when the seed's
        # draw for its position is that draft).
        assert [t for d in deltas for t in d.new_token_ids] == [
            t for d in plain[rid] for t in d.new_token_ids]
        tokens = [t for d in deltas for t in d.new_token_ids]
        logprobs = [lp for d in deltas for lp in d.logprobs or []]
        assert len(tokens) == 17 and [lp.token_id for lp in logprobs] == tokens
        assert all(len(lp.top) == 2 for lp in logprobs)
        assert tokens == [t for d in second[rid] for t in d.new_token_ids]  # same seed


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_no_block_leaks_with_speculation_random_aborts_and_preemption(async_scheduling):
    rng = random.Random(11)
    core = tiny_core(num_kv_blocks=40, max_num_seqs=8, speculative="ngram",
                     speculative_max_batch=8, max_num_batched_tokens=48,
                     async_scheduling=async_scheduling)
    prompts = repetitive_prompts(rng, 60)
    requests = {f"r{i}": (p, SamplingParams(max_tokens=rng.randint(1, 30), ignore_eos=True,
                                            temperature=rng.choice([0.0, 0.8]), seed=i))
                for i, p in enumerate(prompts)}
    aborts = {rid: rng.randint(0, 10) for rid in requests if rng.random() < 0.3}
    out = run_core(core, requests, abort_after=aborts)
    assert all(d[-1].finished for d in out.values())
    stats = core.stats()
    assert stats.num_preemptions > 0 and stats.spec_accepted_tokens > 0
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total
    assert not core.runner.batch._row_of and not core.spec._states  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["ngram", "draft"])
def test_with_async_scheduling_only_steps_with_drafts_run_synchronously(mode):
    """Six requests and speculation up to two: the large batches overlap (async), the
    last two requests speculate (synchronous steps); greedy and seeded outputs are plain
    decoding's, and the pool ends all free."""
    prompts = repetitive_prompts(random.Random(13), 6)
    lengths = [6, 8, 10, 12, 40, 48]  # the last two speculate once they are alone
    draft = {"speculative_draft_model": "tiny-llama"} if mode == "draft" else {}
    for params in (SamplingParams(max_tokens=48, ignore_eos=True),
                   SamplingParams(max_tokens=48, ignore_eos=True, temperature=0.8, seed=5)):
        want = outputs(tiny_core(num_kv_blocks=256), prompts, params)
        core = tiny_core(num_kv_blocks=256, speculative=mode, speculative_max_batch=2,
                         async_scheduling=True, **draft)
        for i, p in enumerate(prompts):
            core.add(core.make_request(f"r{i}", p, replace(params, max_tokens=lengths[i])))
        got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
        overlapped = synchronous = 0
        while core.has_work():
            for d in core.step():
                got[d.request_id] += d.new_token_ids
            # A step that left nothing in flight while work remains ran synchronously.
            overlapped += core._inflight is not None
            synchronous += core._inflight is None and core.has_work()
        # Only steps that verify drafts are synchronous: sampled, the random model's
        # text hardly repeats, and every step may overlap.
        verified = core.stats().spec_verifications > 0
        assert overlapped > 0 and (synchronous > 0) == verified
        assert verified or params.temperature > 0
        assert got == {f"r{i}": w[:lengths[i]] for i, w in enumerate(want)}
        stats = core.stats()
        assert stats.num_kv_blocks_free == stats.num_kv_blocks_total


def test_with_async_scheduling_refused_drafts_leave_steps_overlapping():
    """A budget of one token leaves no slot for a draft: the request plans drafts (backing
    off as they are refused), every step overlaps the next, and the output is plain
    decoding's."""
    prompt = repetitive_prompts(random.Random(3), 1)[0]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    want = outputs(tiny_core(num_kv_blocks=256), [prompt], params)[0]
    core = tiny_core(num_kv_blocks=256, speculative="ngram", async_scheduling=True,
                     max_num_batched_tokens=1)
    req = core.make_request("r", prompt, params)
    core.add(req)
    got, looks = [], []
    while core.has_work():
        got += [t for d in core.step() for t in d.new_token_ids]
        looks.append(req.num_lookahead)
        assert core._inflight is not None or not core.has_work()  # never synchronous
    assert got == want
    first = looks.index(6)  # the first decode after the prompt (one token a step)
    assert first == len(prompt)
    assert [i - first for i, k in enumerate(looks) if k] == [0, 2, 5, 10, 19]
    assert core.stats().spec_proposed_tokens == 0


@pytest.mark.skipif(cpu_kernels.load() is None, reason="needs the bf16 CPU kernels")
@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_the_real_model_in_bf16_speculates_to_the_same_tokens(model_dir, quantization):
    from genmesh.bench.speculation import GROUNDED
    from genmesh.bench.variants import chat_prompts
    from services.worker.engine.core import EngineCore

    prompts = chat_prompts(str(model_dir), [GROUNDED[i] for i in (2, 6, 8)])
    params = SamplingParams(max_tokens=48)
    config = EngineConfig(model=str(model_dir), num_kv_blocks=128, quantization=quantization)
    plain = EngineCore(config)
    spec = EngineCore(replace(config, speculative="ngram"))
    for i, p in enumerate(prompts):
        want = outputs(plain, [p], params)[0]
        assert outputs(spec, [p], params)[0] == want, i
    stats = spec.stats()
    assert stats.spec_tokens_per_step > 2.0  # these answers repeat their prompts
