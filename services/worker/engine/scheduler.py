"""Iteration-level (continuous) batching: which requests compute how many tokens this step.

One token budget per step covers prefill chunks and decodes alike: a request is owed
``num_tokens - num_computed_tokens`` tokens and gets as many as the budget allows.
Running requests are served first, in priority order; waiting ones are admitted after
them. A waiting request of a higher class than some running ones (an online call behind
batch work) gets its first step without them: its prefill is not slowed by their
decodes, which resume the step after. When the block pool runs dry, the lowest-priority,
latest-arriving running request is preempted by recompute (its blocks freed, its progress
reset); its cached full blocks usually let it resume cheaply. Speculative drafts get
what the step leaves over, budget and blocks, once every chunk is scheduled: a guess
never shortens, delays or preempts another request's work, nor keeps one out.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.outputs import FinishReason
from services.worker.engine.request import Request, RequestStatus


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """The tokens one request computes this step: ``all_ids[start:start + num_tokens]``,
    then its draft tokens ``spec_ids`` (speculative decoding) at the positions after."""

    request: Request
    start: int  # num_computed_tokens when scheduled (the first new position)
    num_tokens: int  # known tokens (the drafts not counted)
    num_lookahead: int = 0  # KV slots reserved for drafts after the known tokens
    spec_ids: tuple[int, ...] = ()  # the drafts proposed for them (at most num_lookahead)

    @property
    def completes_sequence(self) -> bool:
        """True when the chunk reaches the last known token, so a new token is sampled."""
        return self.start + self.num_tokens == self.request.num_tokens

    @property
    def num_computed(self) -> int:
        """Tokens whose KV the step computes: the known ones and the drafts."""
        return self.num_tokens + len(self.spec_ids)

    def token_ids(self) -> list[int]:
        """The step's input tokens of this request, drafts last."""
        ids = self.request.all_ids[self.start:self.start + self.num_tokens]
        return ids + list(self.spec_ids) if self.spec_ids else ids


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_computed for c in self.chunks)


def _order(req: Request) -> tuple[int, float]:
    return (int(req.priority), req.arrival_time)


class Scheduler:
    def __init__(self, *, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int = 2**62) -> None:
        self.blocks = block_manager
        self.max_model_len = max_model_len  # the default: no request ends by the context
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Request] = []  # sorted by (priority, arrival)
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up at first admission
        self.prefix_cache_hits = 0  # of those, tokens found in the cache

    # -- queues ----------------------------------------------------------------------

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        bisect.insort(self.waiting, req, key=_order)

    def finish(self, req: Request, reason: FinishReason) -> None:
        """Take ``req`` out of the queues and release its blocks."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self.blocks.free(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        self.running.remove(victim)
        self.blocks.free(victim)
        victim.num_computed_tokens = 0
        victim.num_lookahead = 0  # planned for a decode it no longer runs
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.add(victim)
        out.preempted.append(victim)

    # -- one step --------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        self.running.sort(key=_order)

        # 1. Running requests, most important first; make room by preempting the least.
        # Those of a lower class than an urgent newcomer sit this step out.
        cutoff = self._urgent_priority()
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if cutoff is not None and req.priority > cutoff:
                break  # sorted: everything from here on is of a lower class
            if self._ends_with_pending_token(req):
                i += 1  # its last token is in flight: a step more would be thrown away
                continue
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while self.blocks.allocate(req, num_new) is None:
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, num_new))
                budget -= num_new
                i += 1
                continue
            break  # req preempted itself: nothing behind it can run either

        # 2. Waiting requests, unless running ones already ran out of blocks.
        blocks_short = bool(out.preempted)
        while self.waiting and budget > 0 and not blocks_short:
            req = self.waiting[0]
            if len(self.running) >= self.max_num_seqs:
                lower = self._least_important_below(req)
                if lower is None:
                    break
                budget += self._unschedule(lower, out)
                self._preempt(lower, out)
                continue
            cached = self.blocks.find_cached_prefix(req)
            num_cached = len(cached) * self.blocks.block_size
            num_new = min(req.num_tokens - num_cached, budget)
            if self.blocks.allocate(req, num_new, cached) is None:
                victims = self._victims_to_fit(req, self.blocks.shortfall(req, num_new, cached))
                if not victims:
                    break
                for victim in victims:
                    budget += self._unschedule(victim, out)
                    self._preempt(victim, out)
                continue
            self.waiting.pop(0)
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_cached
            if req.num_cached_prompt_tokens < 0:
                req.num_cached_prompt_tokens = min(num_cached, req.num_prompt_tokens)
                self.prefix_cache_queries += req.num_prompt_tokens
                self.prefix_cache_hits += req.num_cached_prompt_tokens
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, num_cached, num_new))
            budget -= num_new
        self._reserve_drafts(out, budget)
        return out

    def _reserve_drafts(self, out: SchedulerOutput, budget: int) -> None:
        """Give the decodes that plan drafts (``num_lookahead``) KV slots for them, in
        priority order, out of what the step leaves: the ``budget`` and the free blocks
        no request took (and slots left in their own blocks). Drafts come last, so a
        guess never delays, preempts or keeps out another request: every other chunk
        is what it would be without them."""
        for j, chunk in enumerate(out.chunks):
            req = chunk.request
            if budget <= 0:
                break
            if req.num_lookahead <= 0 or chunk.num_tokens != 1 or not chunk.completes_sequence:
                continue
            k = min(req.num_lookahead, budget, req.lookahead_room(self.max_model_len),
                    self.blocks.num_slots(req, self.blocks.num_free_blocks) - 1)
            if k > 0 and self.blocks.allocate(req, 1 + k) is not None:
                out.chunks[j] = replace(chunk, num_lookahead=k)
                budget -= k

    def on_drafts_accepted(self, req: Request, num_accepted: int) -> None:
        """Verification kept ``num_accepted`` drafts of ``req``'s last step: their KV,
        written by that step, now counts as computed (that of the rejected ones is
        overwritten when those positions are computed again), and blocks that became
        full join the prefix cache."""
        if num_accepted <= 0 or req.status is not RequestStatus.RUNNING:
            return
        req.num_computed_tokens += num_accepted
        self.blocks.cache_full_blocks(req)

    def _ends_with_pending_token(self, req: Request) -> bool:
        """Async scheduling: the token in flight (a placeholder) is known to end the
        request by length, whatever it turns out to be."""
        return req.has_placeholder and req.is_at_length_limit(self.max_model_len)

    def _urgent_priority(self) -> int | None:
        """The class of the first waiting request when it is more important than some
        running request and can be admitted now (a free sequence slot and the blocks for
        its prompt), else None."""
        if not self.waiting or not self.running:
            return None
        req = self.waiting[0]
        if req.priority >= max(r.priority for r in self.running):
            return None
        if len(self.running) >= self.max_num_seqs:
            return None
        if self.blocks.blocks_needed(req.num_tokens) > self.blocks.num_free_blocks:
            return None
        return int(req.priority)

    def _lower_than(self, req: Request) -> list[Request]:
        """Running requests of a strictly lower class than ``req``, least important first."""
        lower = [r for r in self.running if r.priority > req.priority]
        return sorted(lower, key=_order, reverse=True)

    def _least_important_below(self, req: Request) -> Request | None:
        lower = self._lower_than(req)
        return lower[0] if lower else None

    def _victims_to_fit(self, req: Request, num_blocks: int) -> list[Request]:
        """The fewest lower-class running requests whose preemption frees ``num_blocks``
        blocks for ``req``, least important first; none if even all of them would not
        (preempting them would then throw their work away for nothing)."""
        victims, freed = [], 0
        for victim in self._lower_than(req):
            victims.append(victim)
            freed += self.blocks.num_exclusive_blocks(victim)
            if freed >= num_blocks:
                return victims
        return []

    @staticmethod
    def _unschedule(victim: Request, out: SchedulerOutput) -> int:
        """Drop ``victim``'s chunk from this step; returns the tokens it gives back."""
        for i, chunk in enumerate(out.chunks):
            if chunk.request is victim:
                del out.chunks[i]
                return chunk.num_tokens  # (drafts are reserved after every chunk)
        return 0

    def on_step_done(self, out: SchedulerOutput) -> list[ScheduledChunk]:
        """Advance token counts after the model ran; returns the chunks to sample for."""
        to_sample = []
        for chunk in out.chunks:
            req = chunk.request
            if req.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            completes = chunk.completes_sequence
            req.num_computed_tokens = chunk.start + chunk.num_tokens
            self.blocks.cache_full_blocks(req)
            if completes:
                to_sample.append(chunk)
        return to_sample
