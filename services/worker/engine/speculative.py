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
that runs more than ``speculative_max_batch`` requests, and each request's draft count
follows its measured acceptance. Drafts are accepted in runs: the first draft with
probability ``h1``, and each next one, given the one before was, with ``h`` (copying
text, once a run starts it tends to go on, so ``h`` is usually well above ``h1``). Both
are estimated per request from its verifications (decayed counts over a prior). ``k``
drafts then yield ``1 + sum_{j<=k} h1 h^(j-1)`` tokens for a step that costs
``1 + c k`` plain steps (``c``: one more verified row, plus a draft model's forward
where one proposes), and ``k`` is the count that maximises that ratio, zero when none
beats a plain step by 5%. A request that stopped speculating tries one draft again every
``PROBE_EVERY`` steps, so a text that turns repetitive is caught, unless the draft
model's measured cost is such that even drafts all accepted would not pay. A request
whose drafts the scheduler refuses (no blocks or budget to spare, scheduler.py) plans
none for the next 1, 2, 4, ... steps while the refusals go on.
"""

from __future__ import annotations

from collections.abc import Sequence
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
# Priors (as counts: successes, trials) of the first draft's acceptance and of each next
# draft's given the one before was accepted.
PRIOR_FIRST = (1.4, 2.0)
PRIOR_NEXT = (1.6, 2.0)
# Cost of one more verified row relative to a plain decode step, by device: on the CPU
# the row-exact kernels are bound by bf16 arithmetic past a few rows (measured 0.1 a row
# for the 135M model), on a GPU a decode step is bound by launches and bytes.
ROW_COST = {"cpu": 0.1, "cuda": 0.03}
DRAFT_COST_PRIOR = 0.5
# Speculate only for an expected gain of this much over a plain step: the estimates
# are rough, and a marginal gain is not worth a wrong guess.
MIN_GAIN = 1.05  # a draft model's forward per plain step, until measured


class Proposer(Protocol):
    has_model: bool  # proposes with a model's forward passes (they cost time)
    num_forwards: int  # draft steps (a token or two a request) run so far
    decode_seconds: float  # and the seconds they took

    def follow(self, chunks: Sequence[ScheduledChunk]) -> None:
        """See the prefill chunks of requests that will speculate."""
        ...

    def propose(self, chunks: Sequence[ScheduledChunk]) -> list[tuple[int, ...]]:
        """Drafts for each chunk, at most its ``num_lookahead`` (maybe none)."""
        ...

    def release(self, request_id: str) -> None:
        """Forget a request (finished or preempted)."""
        ...


class NgramProposer:
    """Prompt lookup: match the last ``n`` tokens (n from ``max_n`` down to ``min_n``)
    against the rest of the sequence; the latest earlier match wins and the tokens that
    followed it are the drafts."""

    has_model = False
    num_forwards = 0
    decode_seconds = 0.0

    def __init__(self, *, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, chunks: Sequence[ScheduledChunk]) -> list[tuple[int, ...]]:
        return [self.lookup(c.request.all_ids, c.num_lookahead) for c in chunks]

    def release(self, request_id: str) -> None:
        pass

    def follow(self, chunks: Sequence[ScheduledChunk]) -> None:
        pass

    def lookup(self, ids: list[int], k: int) -> tuple[int, ...]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest
        matching suffix of ``ids``; () when none of ``min_n`` tokens or more recurs."""
        if k <= 0 or len(ids) <= self.min_n:
            return ()
        seq = np.asarray(ids, dtype=np.int64)
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            # Windows starting before the suffix itself: seq[i:i + n] for i < len - n.
            windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
            hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return tuple(int(t) for t in seq[start:start + k])
        return ()


@dataclass(slots=True)
class _RequestState:
    first: list[float] = field(default_factory=lambda: list(PRIOR_FIRST))  # [hits, trials]
    next: list[float] = field(default_factory=lambda: list(PRIOR_NEXT))
    idle_steps: int = 0  # steps since it last speculated
    backoff: int = 0  # plans skipped after its last refusal (0: its last plan was granted)
    num_skips: int = 0  # plans still to skip

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        for counts in (self.first, self.next):
            counts[0] *= DECAY
            counts[1] *= DECAY
        self.first[0] += num_accepted >= 1
        self.first[1] += 1
        if num_accepted >= 1 and num_drafts >= 2:
            # Drafts 2..k whose predecessor was accepted: accepted - 1 of them passed,
            # and one more was tried unless the run reached the last draft.
            self.next[0] += num_accepted - 1
            self.next[1] += num_accepted - 1 + (num_accepted < num_drafts)
        self.idle_steps = 0

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


def best_num_drafts(first: float, next_: float, max_drafts: int, cost: float) -> int:
    """The draft count that maximises expected tokens per unit of step cost, for a
    first-draft acceptance ``first`` and a next-given-previous one ``next_`` (0: none
    beats a plain step by MIN_GAIN)."""
    best_k, best = 0, MIN_GAIN
    tokens, survive = 1.0, first
    for k in range(1, max_drafts + 1):
        tokens += survive
        survive *= next_
        value = tokens / (1 + cost * k)
        if value > best * 1.0001:
            best_k, best = k, value
    return best_k


class Speculation:
    """Per-step speculation policy and bookkeeping; the engine core calls ``plan``
    before scheduling, ``propose`` after it, and ``observe`` after verification."""

    def __init__(self, config: EngineConfig, proposer: Proposer, *, device_type: str,
                 max_model_len: int, misses_cost: bool = False) -> None:
        self.proposer = proposer
        self.max_drafts = config.num_speculative_tokens
        self.max_batch = config.speculative_max_batch
        self.by_default = config.speculative_by_default
        self.row_cost = ROW_COST.get(device_type, ROW_COST["cuda"])
        self.max_model_len = max_model_len
        self.stats = SpecStats(accepted_histogram=[0] * (self.max_drafts + 1))
        self._states: dict[str, _RequestState] = {}
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
        for req in running:
            decoding = (bool(req.output_ids) and req.num_tokens - req.num_computed_tokens == 1
                        and req.lookahead_room(self.max_model_len) > 0)
            req.num_lookahead = (self._num_drafts(req) if decoding and not large
                                 and self.wants(req) else 0)

    def _num_drafts(self, req: Request) -> int:
        state = self._states.setdefault(req.request_id, _RequestState())
        if state.num_skips > 0:  # backing off after the scheduler refused its drafts
            state.num_skips -= 1
            return 0
        k = best_num_drafts(state.first[0] / state.first[1], state.next[0] / state.next[1],
                            self.max_drafts, self.row_cost + self.draft_cost)
        if k == 0 and self.can_pay():
            state.idle_steps += 1
            if state.idle_steps >= PROBE_EVERY:
                state.idle_steps = 0
                return 1
        return k

    def can_pay(self) -> bool:
        """Whether drafts could pay at all: even drafts all accepted cannot make up for
        a draft model nearly as slow as the model (then no probes and no prefill for
        the draft, which would be spent for nothing)."""
        return best_num_drafts(1.0, 1.0, self.max_drafts, self.row_cost + self.draft_cost) > 0

    @property
    def draft_cost(self) -> float:
        """A proposer's forward pass per draft relative to a plain step (0 without a
        model): measured, with a prior until both have been seen."""
        if not self.proposer.has_model:
            return 0.0
        if self._propose_s <= 0.0 or self._plain_s <= 0.0:
            return DRAFT_COST_PRIOR
        return self._propose_s / self._plain_s

    def record_times(self, *, propose_s: float | None = None, num_forwards: int = 0,
                     plain_step_s: float | None = None) -> None:
        """Feed the cost model: a proposal's seconds over its draft forwards, or a plain
        step's seconds (decayed means)."""
        if propose_s is not None and num_forwards > 0:
            per = propose_s / num_forwards
            self._propose_s = per if self._propose_s <= 0 else 0.9 * self._propose_s + 0.1 * per
        if plain_step_s is not None:
            self._plain_s = (plain_step_s if self._plain_s <= 0
                             else 0.9 * self._plain_s + 0.1 * plain_step_s)

    def propose(self, chunks: list[ScheduledChunk]) -> list[ScheduledChunk]:
        """The chunks with their drafts filled in (those that reserved slots). A request
        that planned drafts and got no slots for them backs off
        (``_RequestState.on_scheduled``)."""
        for c in chunks:
            if c.request.num_lookahead > 0:
                self._states.setdefault(c.request.request_id, _RequestState()).on_scheduled(
                    granted=c.num_lookahead > 0)
        prefills = [c for c in chunks if c.num_tokens > 1 and self.wants(c.request)]
        if prefills and self.can_pay():
            self.proposer.follow(prefills)
        wanting = [i for i, c in enumerate(chunks) if c.num_lookahead > 0]
        if not wanting:
            return chunks
        seconds, forwards = self.proposer.decode_seconds, self.proposer.num_forwards
        drafts = self.proposer.propose([chunks[i] for i in wanting])
        self.record_times(propose_s=self.proposer.decode_seconds - seconds,
                          num_forwards=self.proposer.num_forwards - forwards)
        out = list(chunks)
        for i, d in zip(wanting, drafts, strict=True):
            if d:
                out[i] = replace(chunks[i], spec_ids=tuple(d[:chunks[i].num_lookahead]))
            elif self.misses_cost:
                rid = chunks[i].request.request_id
                self._states.setdefault(rid, _RequestState()).observe(1, 0)
        return out

    def observe(self, req: Request, num_drafts: int, num_accepted: int) -> None:
        """Record one verification of ``num_drafts`` drafts, ``num_accepted`` kept."""
        s = self.stats
        s.proposed_tokens += num_drafts
        s.accepted_tokens += num_accepted
        s.verifications += 1
        s.emitted_tokens += num_accepted + 1
        s.accepted_histogram[num_accepted] += 1
        self._states.setdefault(req.request_id, _RequestState()).observe(num_drafts,
                                                                        num_accepted)

    def release(self, request_id: str) -> None:
        self._states.pop(request_id, None)
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
        proposer = NgramProposer(min_n=config.ngram_min, max_n=config.ngram_max)
    else:
        from services.worker.engine.draft_model import DraftModelProposer

        proposer = DraftModelProposer(config, model_cfg, blocks, max_model_len=max_model_len)
    return Speculation(config, proposer, device_type=device_type, max_model_len=max_model_len,
                       misses_cost=async_scheduling)
