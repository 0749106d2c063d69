"""Speculative decoding: which requests speculate, how many drafts, and who proposes them.

A step that speculates for a request schedules its decode plus ``k`` draft tokens
(the scheduler reserves their KV slots), a proposer fills the drafts in, and the
target model computes logits for all ``k + 1`` positions in the same forward pass. The
sampler then keeps the longest run of drafts it accepts and adds one token of its own
(``Sampler.launch_verify``), so a step emits between 1 and ``k + 1`` tokens.

Proposers:
- ``NgramProposer``: prompt lookup. The request's last few tokens are searched for
  earlier in its own prompt and output; the tokens that followed that occurrence are
  the drafts. No model, nothing on the device; strong when the answer repeats the
  input (editing, summarising, refactoring code).
- ``DraftModelProposer`` (draft_model.py): a small model sharing the tokenizer runs
  ``k`` cheap decode steps.

The ``Speculation`` controller backs off on its own: no request speculates in a step
that runs more than ``speculative_max_batch`` requests, and each draft count follows
measured acceptance. Drafts are accepted in runs: the first draft with probability
``h1``, and each next one, given the one before was, with ``h`` (copying text, once a
run starts it tends to go on, so ``h`` is usually well above ``h1``). Both are
estimated from verifications (decayed counts over a prior) per *kind* of drafts, which
the proposer names before any slot is reserved (``Proposer.kind``): n-gram drafts by
how their match was found (``match_kind``: its length and whether earlier occurrences
disagree, which predict acceptance far better than the request does), a draft model's
per request. ``k`` drafts then yield ``1 + sum_{j<=k} h1 h^(j-1)`` tokens for a step
that costs ``C(k)`` plain steps (``StepCosts``: measured per batch size and draft
count, plus a draft model's forward per draft where one proposes), and ``k`` is the
count that maximises that ratio, zero when none beats a plain step by 5%. The cost is
far from linear in ``k`` on a CPU: a few more rows ride on the weights' bytes almost
free, and past that each costs its arithmetic (SmolLM2-135M here: 3 drafts 1.1-1.3
plain steps, 8 drafts 1.9-2.0). A step's requests are planned in turn, each priced with
the drafts planned before it and against all the tokens the step emits. A kind whose
drafts stopped paying is tried with one draft again every ``PROBE_EVERY`` plans, so a
text that turns repetitive is caught, unless the draft model's measured cost is such
that even drafts all accepted would not pay. A request with nothing to propose (no
n-gram recurs) reserves nothing, nor more slots than it has drafts. A request whose
drafts the scheduler refuses (no blocks or budget to spare, scheduler.py) plans none
for the next 1, 2, 4, ... steps while the refusals go on.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.config import EngineConfig
from services.worker.engine.model.config import ModelConfig
from services.worker.engine.request import Request
from services.worker.engine.scheduler import ScheduledChunk

PROBE_EVERY = 16  # steps between one-draft probes of a request that stopped speculating
DECAY = 0.9  # weight of the past in a request's acceptance estimates, per verification
# ... and in estimates that many requests' drafts share (a kind of n-gram match)
SHARED_DECAY = 0.97
# Priors (as counts: successes, trials) of the first draft's acceptance and of each next
# draft's given the one before was accepted.
PRIOR_FIRST = (1.4, 2.0)
PRIOR_NEXT = (1.6, 2.0)
# The prior cost of one more verified row relative to a plain decode step, by device,
# until StepCosts has measured it: on the CPU the row-exact kernels are bound by bf16
# arithmetic past a few rows (0.1 a row on average over 8 drafts for the 135M model), on
# a GPU a decode step is bound by launches and bytes.
ROW_COST = {"cpu": 0.1, "cuda": 0.03}
COST_DECAY = 0.9  # weight of the past in a measured step cost, per step seen
# The prior's weight, as a number of steps seen; decayed sums of steps reach 10, so
# once a cost has been measured a few times the prior is a small part of it.
COST_PRIOR_WEIGHT = 1.0
DRAFT_COST_PRIOR = 0.5
# Speculate only for an expected gain of this much over a plain step: the estimates
# are rough, and a marginal gain is not worth a wrong guess.
MIN_GAIN = 1.05  # a draft model's forward per plain step, until measured


class Proposer(Protocol):
    has_model: bool  # proposes with a model's forward passes (they cost time)
    num_forwards: int  # draft steps (a token or two a request) run so far
    decode_seconds: float  # and the seconds they took

    def kind(self, req: Request) -> Hashable | None:
        """What the request's next drafts would be, as far as their acceptance goes: a
        key whose acceptance estimates drafts of that kind share (the request's id: its
        own), or None where there would be none (it reserves no slots then)."""
        ...

    def available(self, req: Request) -> int:
        """How many drafts it could propose for the request now (after ``kind``)."""
        ...

    def follow(self, chunks: Sequence[ScheduledChunk]) -> None:
        """See the prefill chunks of requests that will speculate."""
        ...

    def propose(self, chunks: Sequence[ScheduledChunk]) -> list[tuple[int, ...]]:
        """Drafts for each chunk, at most its ``num_lookahead`` (maybe none)."""
        ...

    def release(self, request_id: str) -> None:
        """Forget a request (finished or preempted)."""
        ...


@dataclass(frozen=True, slots=True)
class Match:
    """An n-gram lookup's drafts, the length of the suffix that matched, and whether
    its earlier occurrences went on differently (ambiguous: the latest one's way was
    picked among others)."""

    drafts: tuple[int, ...]
    n: int
    ambiguous: bool


def match_kind(m: Match, *, greedy: bool = True) -> tuple[str, int, bool, bool]:
    """Drafts' kind by how they were found: the suffix length (1, 2, 3-5, 6 or more)
    and ambiguity, and whether the request samples (a sampled draw keeps a draft less
    often than an argmax). Measured here (SmolLM2-135M, greedy, 24 prompts, min_n 1,
    max_n 6): a first draft was accepted 0.90 of the time after a match of 6 or more,
    0.7-0.9 after 3-5, 0.24-0.68 after 1-2, and 0.14-0.2 after an ambiguous match of 1."""
    return ("ngram", 6 if m.n >= 6 else 3 if m.n >= 3 else m.n, m.ambiguous, greedy)


class NgramProposer:
    """Prompt lookup: match the last ``n`` tokens (n from ``max_n`` down to ``min_n``)
    against the rest of the sequence; the latest earlier match wins and the tokens that
    followed it are the drafts. Drafts share acceptance estimates by ``match_kind``,
    engine-wide: how a match was found says more than which request found it."""

    has_model = False
    num_forwards = 0
    decode_seconds = 0.0

    def __init__(self, *, min_n: int, max_n: int, max_drafts: int = 8) -> None:
        self.min_n, self.max_n, self.max_drafts = min_n, max_n, max_drafts
        # request id -> (its token count, its match): kind() looks up, propose() reuses
        self._last: dict[str, tuple[int, Match | None]] = {}

    def kind(self, req: Request) -> Hashable | None:
        if req.has_placeholder:  # its last token is on the device yet: judged by its past
            return req.request_id
        m = self._match(req)
        return None if m is None else match_kind(m, greedy=req.params.is_greedy)

    def available(self, req: Request) -> int:
        if req.has_placeholder:  # not looked up until its last token is read back
            return self.max_drafts
        m = self._match(req)
        return 0 if m is None else len(m.drafts)

    def _match(self, req: Request) -> Match | None:
        cached = self._last.get(req.request_id)
        if cached is not None and cached[0] == req.num_tokens:
            return cached[1]
        m = self.match(req.all_ids, self.max_drafts)
        self._last[req.request_id] = (req.num_tokens, m)
        return m

    def propose(self, chunks: Sequence[ScheduledChunk]) -> list[tuple[int, ...]]:
        out = []
        for c in chunks:
            m = self._match(c.request) if c.num_lookahead > 0 else None
            out.append(m.drafts[:c.num_lookahead] if m is not None else ())
        return out

    def release(self, request_id: str) -> None:
        self._last.pop(request_id, None)

    def follow(self, chunks: Sequence[ScheduledChunk]) -> None:
        pass

    def lookup(self, ids: list[int], k: int) -> tuple[int, ...]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest
        matching suffix of ``ids``; () when none of ``min_n`` tokens or more recurs."""
        m = self.match(ids, k)
        return () if m is None else m.drafts

    def match(self, ids: list[int], k: int) -> Match | None:
        """``lookup``'s drafts with how they were found; None when nothing recurs."""
        if k <= 0 or len(ids) <= self.min_n:
            return None
        seq = np.asarray(ids, dtype=np.int64)
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            # Windows starting before the suffix itself: seq[i:i + n] for i < len - n.
            windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
            hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                after = seq[hits + n]  # the token that followed each occurrence
                return Match(tuple(int(t) for t in seq[start:start + k]), n,
                             bool((after != after[-1]).any()))
        return None


@dataclass(slots=True)
class _Acceptance:
    """Acceptance estimates of one kind of drafts (decayed counts over a prior)."""

    decay: float = 0.9
    first: list[float] = field(default_factory=lambda: list(PRIOR_FIRST))  # [hits, trials]
    next: list[float] = field(default_factory=lambda: list(PRIOR_NEXT))
    idle_steps: int = 0  # plans of this kind without drafts since it was last tried
    next_seen: bool = False  # a second draft has been verified after an accepted first

    def rates(self) -> tuple[float, float]:
        """(first, next). Until a second draft has been tried, next is at least first:
        drafts planned one at a time would never show it (a draft model accepted 0.99
        of the time stayed at one draft a step on the prior's 0.8)."""
        first, next_ = self.first[0] / self.first[1], self.next[0] / self.next[1]
        return first, next_ if self.next_seen else max(next_, first)

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        for counts in (self.first, self.next):
            counts[0] *= self.decay
            counts[1] *= self.decay
        self.first[0] += num_accepted >= 1
        self.first[1] += 1
        if num_accepted >= 1 and num_drafts >= 2:
            # Drafts 2..k whose predecessor was accepted: accepted - 1 of them passed,
            # and one more was tried unless the run reached the last draft.
            self.next[0] += num_accepted - 1
            self.next[1] += num_accepted - 1 + (num_accepted < num_drafts)
            self.next_seen = True
        self.idle_steps = 0


@dataclass(slots=True)
class _RequestState:
    kind: Hashable | None = None  # the kind its last planned drafts were judged as
    backoff: int = 0  # plans skipped after its last refusal (0: its last plan was granted)
    num_skips: int = 0  # plans still to skip

    def on_scheduled(self, *, granted: bool) -> None:
        """The scheduler granted slots for its planned drafts, or refused them all (the
        pool or the budget had none to spare): each refusal in a row doubles the plans
        skipped after it, 1, 2, 4, ... up to PROBE_EVERY."""
        self.backoff = 0 if granted else min(max(1, 2 * self.backoff), PROBE_EVERY)
        self.num_skips = self.backoff


@dataclass(slots=True)
class SpecStats:
    proposed_tokens: int = 0  # drafts verified
    accepted_tokens: int = 0  # of those, accepted
    verifications: int = 0  # request-steps that verified at least one draft
    emitted_tokens: int = 0  # tokens those request-steps emitted (accepted + 1 each)
    accepted_histogram: list[int] = field(default_factory=list)  # [n]: steps accepting n


def best_num_drafts(first: float, next_: float, costs: Sequence[float],
                    tokens: float = 1.0) -> int:
    """The draft count that maximises the step's expected tokens per unit of its cost,
    for a first-draft acceptance ``first``, a next-given-previous one ``next_`` and
    ``costs[k]``, the step's cost with ``k`` drafts of this request in plain steps, up
    to ``len(costs) - 1`` drafts; ``tokens``: what the step emits without them (1 for a
    request alone). 0: none beats the step without by MIN_GAIN."""
    best_k, best = 0, MIN_GAIN * tokens / costs[0]
    extra, survive = 0.0, first
    for k in range(1, len(costs)):
        extra += survive  # the k-th draft kept: first * next_^(k-1)
        survive *= next_
        value = (tokens + extra) / costs[k]
        if value > best * 1.0001:
            best_k, best = k, value
    return best_k


def expected_extra(first: float, next_: float, k: int) -> float:
    """Drafts expected to be kept of ``k``: ``sum_{j<=k} first next_^(j-1)``."""
    return sum(first * next_ ** (j - 1) for j in range(1, k + 1))


class StepCosts:
    """What drafts cost: a decode step of ``batch`` requests carrying ``drafts`` drafts
    in all, relative to one of the same batch without, from the steps seen (decayed
    means of seconds, each ratio starting from the prior ``1 + row_cost * drafts`` as a
    pseudo-observation of weight COST_PRIOR_WEIGHT, each sample clipped). Only steps
    that ran alone are seen (core.py): with async scheduling, where steps without
    drafts overlap the next, the prior stands."""

    def __init__(self, row_cost: float) -> None:
        self.row_cost = row_cost
        self._plain: dict[int, float] = {}  # batch -> decayed mean seconds, no drafts
        self._ratio: dict[tuple[int, int], tuple[float, float]] = {}  # decayed (sum, weight)

    def record(self, batch: int, drafts: int, seconds: float) -> None:
        """A decode step (no prefill) of ``batch`` requests and ``drafts`` drafts."""
        if drafts == 0:
            old = self._plain.get(batch)
            self._plain[batch] = (seconds if old is None
                                  else COST_DECAY * old + (1 - COST_DECAY) * seconds)
            return
        plain = self._plain.get(batch)
        if plain is None or plain <= 0:
            return  # nothing to compare it with yet
        # One step slowed by the machine (or sped up) moves the estimate only so far.
        sample = min(max(seconds / plain, 0.5), 3.0 * (1.0 + self.row_cost * drafts))
        total, weight = self._ratio.get((batch, drafts), (0.0, 0.0))
        self._ratio[batch, drafts] = (COST_DECAY * total + sample, COST_DECAY * weight + 1.0)

    def ratio(self, batch: int, drafts: int) -> float:
        """A step's cost with ``drafts`` drafts in plain steps of the same batch."""
        if drafts == 0:
            return 1.0
        prior = 1.0 + self.row_cost * drafts
        total, weight = self._ratio.get((batch, drafts), (0.0, 0.0))
        return (COST_PRIOR_WEIGHT * prior + total) / (COST_PRIOR_WEIGHT + weight)

    def curve(self, batch: int, max_drafts: int) -> list[float]:
        """ratio(batch, k) for k = 0..max_drafts, made non-decreasing: a row more never
        costs less (a measured dip is the machine's noise, and would make drafts look
        free)."""
        out = [1.0]
        for k in range(1, max_drafts + 1):
            out.append(max(out[-1], self.ratio(batch, k)))
        return out


class Speculation:
    """Per-step speculation policy and bookkeeping; the engine core calls ``plan``
    before scheduling, ``propose`` after it, and ``observe`` after verification."""

    def __init__(self, config: EngineConfig, proposer: Proposer, *, device_type: str,
                 max_model_len: int, misses_cost: bool = False) -> None:
        self.proposer = proposer
        self.max_drafts = config.num_speculative_tokens
        self.max_batch = config.speculative_max_batch
        self.by_default = config.speculative_by_default
        self.costs = StepCosts(ROW_COST.get(device_type, ROW_COST["cuda"]))
        self._batch = 1  # requests running at the last plan
        self.max_model_len = max_model_len
        self.stats = SpecStats(accepted_histogram=[0] * (self.max_drafts + 1))
        self._states: dict[str, _RequestState] = {}
        self._acceptance: dict[Hashable, _Acceptance] = {}  # by kind of drafts
        self._propose_s = 0.0  # mean seconds of a proposer's forward pass
        self._plain_s = 0.0  # mean seconds of a step without drafts
        # A request that reserved drafts and got none (no n-gram match) counts as a
        # rejected first draft when that costs something: with async scheduling, where
        # its step waited for the one before for nothing. Without, an empty reservation
        # costs nothing and the next match is taken at once.
        self.misses_cost = misses_cost

    def wants(self, req: Request) -> bool:
        p = req.params
        on = p.speculative if p.speculative is not None else self.by_default
        return on and p.can_speculate and len(req.output_ids) >= p.min_tokens

    def plan(self, running: Sequence[Request]) -> None:
        """Set each running request's ``num_lookahead`` for the next schedule: none for
        one whose next step is not a decode (in its prompt, or computing it again after
        a preemption) or with no room left for a draft, which the scheduler would
        refuse anyway."""
        large = len(running) > self.max_batch
        self._batch = max(1, len(running))
        # Requests are planned in turn, each against the step as the ones before left
        # it: the drafts planned so far (their rows' cost) and the tokens they are
        # expected to add (a request's drafts also slow the others' tokens).
        curve = self.costs.curve(self._batch, self._batch * self.max_drafts)
        planned, tokens = 0, float(self._batch)
        for req in running:
            decoding = (bool(req.output_ids) and req.num_tokens - req.num_computed_tokens == 1
                        and req.lookahead_room(self.max_model_len) > 0)
            req.num_lookahead = 0
            if not (decoding and not large and self.wants(req)):
                continue
            k, extra = self._num_drafts(req, self._request_costs(curve, planned), tokens)
            req.num_lookahead = k
            planned, tokens = planned + k, tokens + extra

    def _request_costs(self, curve: Sequence[float], planned: int) -> list[float]:
        """A step's cost, in plain steps of its batch (``curve``: by drafts in all), with
        k = 0..max_drafts drafts for one more request beside ``planned`` others: the
        verified rows, plus a draft model's forward per draft where one proposes."""
        return [curve[planned + k] + self.draft_cost * k for k in range(self.max_drafts + 1)]

    def _num_drafts(self, req: Request, costs: Sequence[float], tokens: float
                    ) -> tuple[int, float]:
        """The request's draft count and the tokens they are expected to add."""
        state = self._states.setdefault(req.request_id, _RequestState())
        if state.num_skips > 0:  # backing off after the scheduler refused its drafts
            state.num_skips -= 1
            return 0, 0.0
        state.kind = kind = self.proposer.kind(req)
        if kind is None:  # nothing to propose
            return 0, 0.0
        costs = costs[:self.proposer.available(req) + 1]  # no slots for drafts not there
        acceptance = self._acceptance_of(kind, req)
        first, next_ = acceptance.rates()
        k = best_num_drafts(first, next_, costs, tokens)
        if k == 0 and best_num_drafts(1.0, 1.0, costs, tokens) > 0:
            acceptance.idle_steps += 1
            if acceptance.idle_steps >= PROBE_EVERY:
                acceptance.idle_steps = 0
                k = 1
        return k, expected_extra(first, next_, k)

    def _acceptance_of(self, kind: Hashable, req: Request) -> _Acceptance:
        found = self._acceptance.get(kind)
        if found is None:  # a request's own estimates move faster than shared ones
            found = self._acceptance[kind] = _Acceptance(
                decay=DECAY if kind == req.request_id else SHARED_DECAY)
        return found

    def can_pay(self) -> bool:
        """Whether drafts could pay at all: even drafts all accepted cannot make up for
        a draft model nearly as slow as the model (then no probes and no prefill for
        the draft, which would be spent for nothing)."""
        curve = self.costs.curve(self._batch, self.max_drafts)
        return best_num_drafts(1.0, 1.0, self._request_costs(curve, 0)) > 0

    @property
    def draft_cost(self) -> float:
        """A proposer's forward pass per draft relative to a plain step (0 without a
        model): measured, with a prior until both have been seen."""
        if not self.proposer.has_model:
            return 0.0
        if self._propose_s <= 0.0 or self._plain_s <= 0.0:
            return DRAFT_COST_PRIOR
        return self._propose_s / self._plain_s

    def record_proposal(self, propose_s: float, num_forwards: int) -> None:
        """Feed the cost model a proposal's seconds over its draft forwards."""
        if num_forwards > 0:
            per = propose_s / num_forwards
            self._propose_s = per if self._propose_s <= 0 else 0.9 * self._propose_s + 0.1 * per

    def record_step(self, batch: int, drafts: int, seconds: float) -> None:
        """Feed the cost model a decode step's seconds (its forward and sampling, no
        prefill, nothing overlapping it): ``batch`` requests carrying ``drafts`` drafts."""
        self.costs.record(batch, drafts, seconds)
        plain = seconds / self.costs.ratio(batch, drafts)
        self._plain_s = plain if self._plain_s <= 0 else 0.9 * self._plain_s + 0.1 * plain

    def propose(self, chunks: list[ScheduledChunk]) -> list[ScheduledChunk]:
        """The chunks with their drafts filled in (those that reserved slots). A request
        that planned drafts and got no slots for them backs off
        (``_RequestState.on_scheduled``)."""
        for c in chunks:
            if c.request.num_lookahead > 0:
                self._states.setdefault(c.request.request_id, _RequestState()).on_scheduled(
                    granted=c.num_lookahead > 0)
        # A draft model computes the prompts of requests that may speculate beside the
        # model's prefill, unless the step is a large batch's (where nobody speculates,
        # and a request that comes to speculate later has its draft catch up then).
        prefills = [c for c in chunks if c.num_tokens > 1 and self.wants(c.request)]
        if (prefills and len(chunks) <= self.max_batch and self._batch <= self.max_batch
                and self.can_pay()):
            self.proposer.follow(prefills)
        wanting = [i for i, c in enumerate(chunks) if c.num_lookahead > 0]
        if not wanting:
            return chunks
        seconds, forwards = self.proposer.decode_seconds, self.proposer.num_forwards
        drafts = self.proposer.propose([chunks[i] for i in wanting])
        self.record_proposal(self.proposer.decode_seconds - seconds,
                             self.proposer.num_forwards - forwards)
        out = list(chunks)
        for i, d in zip(wanting, drafts, strict=True):
            if d:
                out[i] = replace(chunks[i], spec_ids=tuple(d[:chunks[i].num_lookahead]))
            elif self.misses_cost:
                self._observe(chunks[i].request, 1, 0)
        return out

    def observe(self, req: Request, num_drafts: int, num_accepted: int) -> None:
        """Record one verification of ``num_drafts`` drafts, ``num_accepted`` kept."""
        s = self.stats
        s.proposed_tokens += num_drafts
        s.accepted_tokens += num_accepted
        s.verifications += 1
        s.emitted_tokens += num_accepted + 1
        s.accepted_histogram[num_accepted] += 1
        self._observe(req, num_drafts, num_accepted)

    def _observe(self, req: Request, num_drafts: int, num_accepted: int) -> None:
        kind = self._states.setdefault(req.request_id, _RequestState()).kind
        self._acceptance_of(req.request_id if kind is None else kind, req).observe(
            num_drafts, num_accepted)

    def release(self, request_id: str) -> None:
        self._states.pop(request_id, None)
        self._acceptance.pop(request_id, None)
        self.proposer.release(request_id)


def build_speculation(config: EngineConfig, model_cfg: ModelConfig, *, blocks: BlockManager,
                      device_type: str, max_model_len: int, async_scheduling: bool = False
                      ) -> Speculation | None:
    """The configured speculation, or None when it is off. With ``async_scheduling`` an
    empty reservation counts as a miss (``Speculation.misses_cost``)."""
    if config.speculative == "off":
        return None
    proposer: Proposer
    if config.speculative == "ngram":
        proposer = NgramProposer(min_n=config.ngram_min, max_n=config.ngram_max,
                                 max_drafts=config.num_speculative_tokens)
    else:
        from services.worker.engine.draft_model import DraftModelProposer

        proposer = DraftModelProposer(config, model_cfg, blocks, max_model_len=max_model_len)
    return Speculation(config, proposer, device_type=device_type, max_model_len=max_model_len,
                       misses_cost=async_scheduling)
