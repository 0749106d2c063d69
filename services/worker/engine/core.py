"""The engine core: one ``step()`` is schedule -> run -> sample -> postprocess.

With async scheduling (the default on CUDA) a step's postprocessing waits one step: the
next step is scheduled and launched before this one's tokens are read back, so the host
prepares step N+1 while the device runs step N.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.config import EngineConfig
from services.worker.engine.input_batch import PendingTokens
from services.worker.engine.model.config import PRESETS, ModelConfig
from services.worker.engine.model_runner import ModelRunner, resolve_model_config
from services.worker.engine.outputs import Delta, EngineStats, FinishReason, TokenLogprob, Usage
from services.worker.engine.params import (
    InvalidRequestError,
    Priority,
    SamplingParams,
)
from services.worker.engine.request import Request, RequestStatus, new_request
from services.worker.engine.sampler import SampledTokens, Sampler
from services.worker.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from services.worker.engine.sizing import max_model_len, num_kv_blocks
from services.worker.engine.speculative import Speculation, build_speculation
from services.worker.engine.structured_output import StructuredOutput

STATS_WINDOW = 64  # steps averaged in batch-size and step-time stats
GRAMMAR_WAIT_S = 0.05  # an otherwise idle step waits this long for a grammar being built


@dataclass(slots=True)
class _LaunchedStep:
    """A step whose model run and sampling are queued on the device."""

    out: SchedulerOutput
    requests: list[Request]  # those it samples a token for, in the rows of ``sampled``
    sampled: SampledTokens  # their tokens, on the device until read
    start_time: float  # the clock when it was scheduled
    phases_ms: tuple[float, float, float]  # host ms: prepare, forward, sampling launched
    # Speculation: each request's drafts, verified in ``sampled`` (None: a plain step,
    # one row each).
    drafts: list[tuple[int, ...]] | None = None


class EngineCore:
    def __init__(self, config: EngineConfig, *, model_cfg: ModelConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        # Every time a request records (arrival, stages, device share) comes from here;
        # tests pass a fake one to get exact numbers.
        self._clock = clock
        self.model_cfg = model_cfg or resolve_model_config(config)
        draft_cfg = None
        if config.speculative == "draft":  # its KV shares the memory of the pool
            from services.worker.engine.draft_model import draft_engine_config
            draft_cfg = resolve_model_config(draft_engine_config(config))
        num_blocks = num_kv_blocks(config, self.model_cfg, draft_cfg)
        self.max_model_len = max_model_len(config, self.model_cfg, num_blocks)
        self.blocks = BlockManager(num_blocks=num_blocks, block_size=config.block_size,
                                   enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(block_manager=self.blocks, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_model_len=self.max_model_len)
        self.runner = ModelRunner(config, self.model_cfg, num_blocks=num_blocks,
                                  max_model_len=self.max_model_len)
        self.sampler = Sampler(self.runner.device, eos_token_ids=self.model_cfg.eos_token_ids)
        self.structured = StructuredOutput(tokenizer_file(config),
                                           vocab_size=self.model_cfg.vocab_size,
                                           eos_token_ids=self.model_cfg.eos_token_ids)
        # Constrained requests whose grammar is being built: not in the scheduler yet.
        self._awaiting_grammar: dict[str, Request] = {}
        self._requests: dict[str, Request] = {}
        self._num_steps = 0
        self._num_finished = 0
        self._generated_tokens = 0
        self._recent_batch: collections.deque[int] = collections.deque(maxlen=STATS_WINDOW)
        self._recent_ms: collections.deque[float] = collections.deque(maxlen=STATS_WINDOW)
        # Host milliseconds of each step's phases (prepare, forward, sample), recent window.
        self._recent_phases: collections.deque[tuple[float, float, float]] = (
            collections.deque(maxlen=STATS_WINDOW))
        self._device_seconds = 0.0
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.runner.device.type == "cuda")
        self.spec: Speculation | None = build_speculation(
            config, self.model_cfg, blocks=self.blocks, device_type=self.runner.device.type,
            max_model_len=self.max_model_len, async_scheduling=self.async_scheduling)
        self._inflight: _LaunchedStep | None = None  # launched, not read back yet
        self._last_completed_time = float("-inf")

    # -- requests --------------------------------------------------------------------

    def make_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                     priority: Priority = Priority.NORMAL, cache_salt: str = "") -> Request:
        """Validate and build a request (raises InvalidRequestError; queues nothing)."""
        if params.constraint is not None and not self.structured.is_available:
            raise InvalidRequestError(
                "constraint", "this model has no tokenizer.json, so constraints cannot be "
                "enforced")
        return new_request(request_id, prompt_ids, params, vocab_size=self.model_cfg.vocab_size,
                           max_model_len=self.max_model_len, priority=priority,
                           cache_salt=cache_salt, arrival_time=self._clock())

    def add(self, req: Request) -> None:
        """Queue a request; a constrained one first waits for its grammar (see step)."""
        if req.request_id in self._requests:
            raise InvalidRequestError("request_id", f"{req.request_id!r} is already running")
        if req.params.constraint is not None:
            self.structured.start(req.request_id, req.params.constraint)
            req.status = RequestStatus.WAITING_FOR_GRAMMAR
            self._requests[req.request_id] = req
            self._awaiting_grammar[req.request_id] = req
            return
        self._requests[req.request_id] = req
        self.scheduler.add(req)

    def abort(self, request_id: str) -> Delta | None:
        """Stop a request now, releasing its blocks; None if it is not here."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        return self._finish(req, FinishReason.ABORT)

    def fail_all(self, message: str) -> list[Delta]:
        """End every request with an error (after an engine failure)."""
        if self._inflight is not None:
            # Wait for the step in flight: its staging buffer is about to be reused.
            with contextlib.suppress(Exception):
                self._inflight.sampled.read()
            self._inflight = None
        return [self._finish(r, FinishReason.ERROR, error=message)
                for r in list(self._requests.values())]

    def has_work(self) -> bool:
        return (self.scheduler.has_work() or self._inflight is not None
                or bool(self._awaiting_grammar))

    # -- one step --------------------------------------------------------------------

    def step(self) -> list[Delta]:
        """Schedule and launch a step; return the deltas of the step that completes: this
        one, or with async scheduling the one launched before it (whose tokens were
        sampled on the device while this one was being scheduled and prepared).
        Constrained requests whose grammar is now built join the queues first."""
        deltas = self._admit_constrained()
        return deltas + self._step()

    def _admit_constrained(self) -> list[Delta]:
        """Queue the requests whose grammar is built; fail those whose grammar failed.
        With nothing else to do, wait a little for a grammar instead of spinning."""
        if not self._awaiting_grammar:
            return []
        if not self.scheduler.has_work() and self._inflight is None:
            self.structured.wait(GRAMMAR_WAIT_S)
        ready, failed = self.structured.take_ready()
        for request_id in ready:
            req = self._awaiting_grammar.pop(request_id)
            req.status = RequestStatus.WAITING
            self.scheduler.add(req)
        return [self._finish(self._requests[rid], FinishReason.ERROR, error=error,
                             invalid_field="constraint")
                for rid, error in failed.items()]

    def _step(self) -> list[Delta]:
        if self.spec is not None:
            self.spec.plan(self.scheduler.running)
        deltas: list[Delta] = []
        launched = self._launch(settle=lambda: deltas.extend(self._settle()))
        deltas.extend(self._settle())
        if launched is None:
            return deltas
        # After the step before was read back: blocks are hashed over real token ids.
        self.scheduler.on_step_done(launched.out)
        if not self.async_scheduling or launched.drafts is not None:
            # A step with drafts runs synchronously, even with async scheduling: the next
            # step's drafts need its tokens, and what it schedules the drafts it kept.
            # Steps without drafts (a large batch, low acceptance, drafts the scheduler
            # refused) go on overlapping.
            return deltas + self._complete(launched, synchronous=True)
        for req in launched.requests:
            if req.status is not RequestStatus.FINISHED:
                req.append_placeholder()
        self._inflight = launched
        return deltas

    def _settle(self) -> list[Delta]:
        """Read back and post-process the step in flight, if any."""
        done, self._inflight = self._inflight, None
        return self._complete(done) if done is not None else []

    def _launch(self, settle: Callable[[], None] | None = None) -> _LaunchedStep | None:
        """Schedule a step, prepare its inputs, run the model and sample on the device;
        nothing is read back. ``settle`` completes the step in flight, for a step that
        needs its tokens on the host first (drafts, penalties, grammars)."""
        t0 = self._clock()
        out = self.scheduler.schedule()
        for victim in out.preempted:  # its blocks are gone; it starts over when readmitted
            self.runner.release(victim.request_id)
            if self.spec is not None:
                self.spec.proposer.release(victim.request_id)
        if self.spec is not None and settle is not None and any(
                c.num_lookahead for c in out.chunks):
            # The scheduler granted draft slots: drafts are proposed from the tokens of
            # the step before, so that one is read back first. Requests it ended drop out.
            settle()
            out.chunks = [c for c in out.chunks if c.request.status is RequestStatus.RUNNING]
        if not out.chunks:
            return None
        if self.spec is not None:
            out.chunks = self.spec.propose(out.chunks)
        for chunk in out.chunks:
            if chunk.request.first_scheduled_time is None:
                chunk.request.first_scheduled_time = t0
        p0 = time.perf_counter()
        tables = [self.blocks.block_ids(c.request.request_id) for c in out.chunks]
        inflight = self._inflight
        pending = None
        if inflight is not None:
            pending = PendingTokens(inflight.sampled.token_ids,
                                    {r.request_id: i for i, r in enumerate(inflight.requests)})
        inputs = self.runner.prepare(out.chunks, tables, pending)
        p1 = time.perf_counter()
        logits = self.runner.run(inputs)
        p2 = time.perf_counter()
        completing = [c for c in out.chunks if c.completes_sequence]
        requests = [c.request for c in completing]
        if settle is not None and inflight is not None and any(
                r.params.reads_output and r.has_placeholder for r in requests):
            settle()  # penalties and grammars read the whole output, the pending token included
        bitmask = self.structured.bitmask([r.request_id for r in requests])
        drafts = None
        if any(c.spec_ids for c in completing):
            drafts = [c.spec_ids for c in completing]
            sampled = self.sampler.launch_verify(logits, requests, drafts,
                                                 bitmask=bitmask)
        else:
            sampled = self.sampler.launch(logits, requests, bitmask=bitmask)
        for req in requests:  # ended by the settle above: forget what launch re-created
            if req.status is RequestStatus.FINISHED:
                self.sampler.release(req.request_id)
        p3 = time.perf_counter()
        return _LaunchedStep(out=out, requests=requests, sampled=sampled, start_time=t0,
                             phases_ms=((p1 - p0) * 1e3, (p2 - p1) * 1e3, (p3 - p2) * 1e3),
                             drafts=drafts)

    def _complete(self, step: _LaunchedStep, *, synchronous: bool = False) -> list[Delta]:
        """Read the step's tokens back (its one synchronization with the device), then
        append them and apply the stop rules. ``synchronous``: nothing ran beside it since
        its launch, so launch to read-back is its device time (on CUDA the launch alone
        says nothing of it)."""
        r0 = time.perf_counter()
        token_ids, logprobs, accepted = step.sampled.read_verified()
        prepare_ms, forward_ms, sample_ms = step.phases_ms
        read_ms = (time.perf_counter() - r0) * 1e3
        self._recent_phases.append((prepare_ms, forward_ms, sample_ms + read_ms))
        if (synchronous and self.spec is not None
                and all(c.num_tokens == 1 for c in step.out.chunks)):
            # The cost model: a decode step's forward and sampling, by batch and drafts.
            self.spec.record_step(len(step.out.chunks),
                                  sum(len(c.spec_ids) for c in step.out.chunks),
                                  (forward_ms + sample_ms + read_ms) / 1e3)
        t1 = self._clock()
        # With a step in flight, steps overlap: each is charged from when the one before
        # it completed, so that the charges add up to the wall time.
        step_s = t1 - max(step.start_time, self._last_completed_time)
        self._charge_device_time(step.out.chunks, step_s)
        self._last_completed_time = t1

        deltas = []
        row = 0
        for i, req in enumerate(step.requests):
            drafts = step.drafts[i] if step.drafts is not None else ()
            rows = range(row, row + len(drafts) + 1)
            row = rows.stop
            if req.status is RequestStatus.FINISHED:
                continue  # aborted, or ended by the step before, while this one ran
            # The rows' tokens up to the first that rejected its draft: the accepted
            # drafts, then the replacement (or, all accepted, the bonus token).
            num_accepted = 0
            while num_accepted < len(drafts) and accepted[rows[num_accepted]]:
                num_accepted += 1
            if drafts:
                assert self.spec is not None
                self.spec.observe(req, len(drafts), num_accepted)
            delta = self._emit(req, [token_ids[r] for r in rows[:num_accepted + 1]],
                               [logprobs[r] for r in rows[:num_accepted + 1]], t1)
            deltas.append(delta)
            if not delta.finished and num_accepted:
                self.scheduler.on_drafts_accepted(req, num_accepted)
        self._num_steps += 1
        self._recent_batch.append(len(step.out.chunks))
        self._recent_ms.append(step_s * 1e3)  # overlapping steps: from the last one's end
        return deltas

    def _emit(self, req: Request, tokens: list[int], logprobs: list[TokenLogprob | None],
              now: float) -> Delta:
        """Append a step's tokens of ``req`` one by one, applying the stop rules after
        each (a stop drops the tokens after it); returns its delta."""
        kept: list[int] = []
        kept_logprobs: list[TokenLogprob] = []
        for token, lp in zip(tokens, logprobs, strict=True):
            req.append_output(token)
            if req.first_token_time is None:
                req.first_token_time = now
            self._generated_tokens += 1
            kept.append(token)
            if lp is not None:
                kept_logprobs.append(lp)
            rejection = self.structured.accept(req.request_id, token)
            if rejection is not None:
                return self._finish(
                    req, FinishReason.ERROR, new_tokens=kept[:-1], error=rejection.message,
                    invalid_field="constraint" if rejection.allowed_by_mask else None)
            reason = self._stop_reason(req, token)
            if reason is not None:
                return self._finish(req, reason, new_tokens=kept,
                                    new_logprobs=kept_logprobs or None)
        return Delta(req.request_id, kept, logprobs=kept_logprobs or None)

    def _charge_device_time(self, chunks: list[ScheduledChunk], step_s: float) -> None:
        """Split a step's wall time among its chunks in proportion to their tokens: a
        step's cost grows with the tokens it computes, so a 500-token prefill chunk pays
        for more of it than a 1-token decode (attention length is ignored). With async
        scheduling a step may hold requests that ended (their last delta was sent) while
        it ran: their share of it is wasted work, counted in the engine's total only."""
        self._device_seconds += step_s
        num_tokens = sum(c.num_computed for c in chunks)
        for chunk in chunks:
            if chunk.request.status is not RequestStatus.FINISHED:
                chunk.request.device_seconds += step_s * chunk.num_computed / num_tokens

    def _stop_reason(self, req: Request, token: int) -> FinishReason | None:
        p = req.params
        if token in p.stop_token_ids:
            return FinishReason.STOP
        if not p.ignore_eos and token in self.model_cfg.eos_token_ids:
            return FinishReason.STOP
        if self.structured.is_finished(req.request_id):  # the grammar allows nothing more
            return FinishReason.STOP
        if req.is_at_length_limit(self.max_model_len):
            return FinishReason.LENGTH
        return None

    def _finish(self, req: Request, reason: FinishReason, *, new_tokens: list[int] | None = None,
                new_logprobs: list[TokenLogprob] | None = None, error: str | None = None,
                invalid_field: str | None = None) -> Delta:
        self.scheduler.finish(req, reason)
        req.drop_placeholder()
        self.runner.release(req.request_id)
        req.finished_time = self._clock()
        self.sampler.release(req.request_id)
        self.structured.release(req.request_id)
        if self.spec is not None:
            self.spec.release(req.request_id)
        self._awaiting_grammar.pop(req.request_id, None)
        del self._requests[req.request_id]
        self._num_finished += 1
        usage = Usage(prompt_tokens=req.num_prompt_tokens,
                      completion_tokens=len(req.output_ids),
                      cached_prompt_tokens=max(req.num_cached_prompt_tokens, 0))
        return Delta(
            req.request_id,
            list(new_tokens or []),
            finish_reason=reason,
            usage=usage,
            logprobs=new_logprobs,
            error=error,
            timings=req.timings(),
            invalid_field=invalid_field,
        )

    # -- stats -----------------------------------------------------------------------

    def stats(self) -> EngineStats:
        s = self.scheduler
        batches, ms = list(self._recent_batch), list(self._recent_ms)
        phases = list(self._recent_phases)

        def mean_phase(i: int) -> float:
            return sum(p[i] for p in phases) / len(phases) if phases else 0.0

        graphs = self.runner.graph_stats()
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            num_kv_blocks_total=self.blocks.num_blocks,
            num_kv_blocks_free=self.blocks.num_free_blocks,
            num_kv_blocks_cached=self.blocks.num_cached_blocks,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            num_preemptions=s.num_preemptions,
            num_steps=self._num_steps,
            num_finished=self._num_finished,
            generated_tokens=self._generated_tokens,
            mean_batch_size=sum(batches) / len(batches) if batches else 0.0,
            mean_step_ms=sum(ms) / len(ms) if ms else 0.0,
            mean_prepare_ms=mean_phase(0),
            mean_forward_ms=mean_phase(1),
            mean_sample_ms=mean_phase(2),
            cuda_graph_batch_sizes=list(graphs.batch_sizes) if graphs else [],
            cuda_graph_pool_bytes=graphs.pool_bytes if graphs else 0,
            cuda_graph_replays=graphs.num_replays if graphs else 0,
            device_seconds=self._device_seconds,
            recent_batch_sizes=batches,
            **self._spec_stats(),
        )

    def _spec_stats(self) -> dict[str, int]:
        if self.spec is None:
            return {}
        s = self.spec.stats
        return {"spec_proposed_tokens": s.proposed_tokens,
                "spec_accepted_tokens": s.accepted_tokens,
                "spec_verifications": s.verifications,
                "spec_emitted_tokens": s.emitted_tokens}


def tokenizer_file(config: EngineConfig) -> Path | None:
    """The tokenizer.json that enforces constraints: in ``config.tokenizer``, else in the
    model folder (a dummy preset has none); None when there is none."""
    folder = config.tokenizer
    if folder is None and not (config.load_format == "dummy" and config.model in PRESETS):
        folder = config.model
    if folder is None:
        return None
    path = Path(folder) / "tokenizer.json"
    return path if path.is_file() else None
