"""TensorRT-LLM behind the ``Engine`` protocol: a thin adapter over ``tensorrt_llm.LLM``.

Written against the documented LLM API of TensorRT-LLM 1.2 (PyTorch backend): ``LLM(...)``
with ``KvCacheConfig``, ``LLM.generate_async(..., streaming=True)`` returning an
async-iterable ``RequestOutput`` (cumulative ``outputs[0].token_ids``, ``finished``,
``finish_reason``, ``abort()``), and ``LLM.get_stats_async(timeout)`` yielding per-iteration
stats dicts. TensorRT-LLM only runs inside NVIDIA's release container on a GPU, so this
module cannot be exercised on the dev machines; its tests use a fake ``tensorrt_llm``.
``import tensorrt_llm`` happens in the constructor only.

Request timings are measured here, at the stream, so some are approximate (see
``_timings``): the runtime's own scheduling time is not visible, and device time is an
equal share of each iteration's latency among the requests in flight.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.worker.engine.config import EngineConfig
from services.worker.engine.model.config import load_model_config
from services.worker.engine.outputs import (
    Delta,
    EngineStats,
    FinishReason,
    RequestTimings,
    TokenLogprob,
    Usage,
)
from services.worker.engine.params import (
    InvalidRequestError,
    Priority,
    SamplingParams,
    validate_prompt,
)
from services.worker.engine.sizing import max_model_len, num_kv_blocks

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 2.0  # get_stats_async's wait for the next iteration's stats
STATS_POLL_S = 1.0  # pause between drains of the stats queue
STATS_WINDOW = 64  # iterations averaged in batch-size and step-time stats
_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH,
           "cancelled": FinishReason.ABORT}


class BackendUnavailableError(RuntimeError):
    """The TensorRT-LLM backend was asked for where it cannot run."""


class TrtLlmEngine:
    """One ``tensorrt_llm.LLM`` per model version; all calls come from one event loop."""

    def __init__(self, config: EngineConfig) -> None:
        try:
            import tensorrt_llm
            from tensorrt_llm.llmapi import KvCacheConfig
        except ImportError as exc:
            raise BackendUnavailableError(
                "backend=tensorrt_llm needs TensorRT-LLM, which is not installed here. It only "
                "runs inside NVIDIA's TensorRT-LLM release container on an NVIDIA GPU; "
                "use backend=native otherwise."
            ) from exc
        self._trt = tensorrt_llm
        self.config = config
        self.model_cfg = cfg = load_model_config(Path(config.model))
        # The same KV pool and context cap as the native engine.
        num_blocks = num_kv_blocks(config, cfg)
        self._max_model_len = max_len = max_model_len(config, cfg, num_blocks)
        self._llm = tensorrt_llm.LLM(
            model=config.model,
            dtype=str(config.torch_dtype).removeprefix("torch."),
            skip_tokenizer_init=True,  # we send token ids; end_id is set per request
            load_format=config.load_format,
            max_batch_size=config.max_num_seqs,
            max_num_tokens=config.max_num_batched_tokens,
            max_seq_len=max_len,
            enable_chunked_prefill=True,  # prompts longer than max_num_tokens, as natively
            enable_iter_perf_stats=True,  # get_stats_async yields nothing without it
            kv_cache_config=KvCacheConfig(
                enable_block_reuse=config.enable_prefix_caching,
                tokens_per_block=config.block_size,
                # The runtime takes the min of this and free_gpu_memory_fraction (0.9).
                max_tokens=num_blocks * config.block_size,
            ),
        )
        self._requests: dict[str, Any] = {}  # request id -> tensorrt_llm RequestOutput
        self._aborted: set[str] = set()
        self._ids = itertools.count()
        self._closed = False
        self._stats_task: asyncio.Task[None] | None = None
        self._last_iter: dict[str, Any] = {}
        self._recent_batch: collections.deque[int] = collections.deque(maxlen=STATS_WINDOW)
        self._recent_ms: collections.deque[float] = collections.deque(maxlen=STATS_WINDOW)
        self._num_finished = self._generated = self._cache_queries = self._cache_hits = 0
        self._device_seconds = 0.0  # the sum of every iteration's latency seen so far
        # The sum, over iterations, of latency / requests in flight: a request's device
        # share is this sum's growth between its arrival and its finish.
        self._device_seconds_per_request = 0.0

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return self.model_cfg.vocab_size

    # -- requests --------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, *,
               request_id: str | None = None, priority: Priority = Priority.NORMAL,
               cache_salt: str = "") -> AsyncIterator[Delta]:
        """Validate, queue on TensorRT-LLM, return the deltas. Raises InvalidRequestError.

        ``priority`` is accepted but unused: the 1.2 LLM API has no per-request priority.
        """
        if self._closed:
            raise RuntimeError("the engine is shut down")
        times = _StreamTimes(time.monotonic(), self._device_seconds_per_request)
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._requests:
            raise InvalidRequestError("request_id", f"{rid!r} is already running")
        validate_prompt(prompt_ids, vocab_size=self.vocab_size, max_model_len=self.max_model_len)
        params.validate(vocab_size=self.vocab_size)
        _refuse_unmapped(params)
        loop = asyncio.get_running_loop()  # before queueing: the stream needs this loop
        try:
            sampling = self._sampling_params(prompt_ids, params)
            result = self._llm.generate_async(list(prompt_ids), sampling_params=sampling,
                                              streaming=True, cache_salt=cache_salt or None)
        except ValueError as exc:  # the LLM API's own argument checks
            raise InvalidRequestError("params", str(exc)) from exc
        self._requests[rid] = result
        if self._stats_task is None:
            self._stats_task = loop.create_task(self._poll_stats())
        return self._stream(rid, result, len(prompt_ids), params.logprobs, times)

    def _sampling_params(self, prompt_ids: list[int], p: SamplingParams) -> Any:
        eos = list(self.model_cfg.eos_token_ids)
        stop = list(p.stop_token_ids) + ([] if p.ignore_eos else eos[1:])
        greedy = p.is_greedy
        return self._trt.SamplingParams(
            max_tokens=min(p.max_tokens, self.max_model_len - len(prompt_ids)),
            # With skip_tokenizer_init the end id must be given; -1 (no end token) is the
            # runtime's own value under ignore_eos. Further end ids become stop tokens.
            end_id=eos[0] if eos else -1,
            ignore_eos=p.ignore_eos,
            stop_token_ids=stop or None,
            include_stop_str_in_output=True,  # stop tokens stay in the output, as natively
            # top_k=1 is greedy on every sampler; when sampling, pass the neutral top_k=0 /
            # top_p=1 explicitly, since all-None also means greedy to the runtime.
            temperature=None if greedy else p.temperature,
            top_k=1 if greedy else p.top_k,
            top_p=None if greedy else p.top_p,
            min_p=None if greedy or p.min_p == 0.0 else p.min_p,
            repetition_penalty=None if p.repetition_penalty == 1.0 else p.repetition_penalty,
            # The runtime's default seed is 0 (deterministic); None means random here.
            seed=None if greedy else (p.seed if p.seed is not None else random.getrandbits(63)),
            logprobs=p.logprobs or None,
            detokenize=False,
            return_perf_metrics=True,  # for the prompt tokens reused from the KV cache
        )

    async def _stream(self, rid: str, result: Any, num_prompt: int,
                      want_logprobs: int, times: _StreamTimes) -> AsyncIterator[Delta]:
        sent, finished = 0, False
        try:
            try:
                async for out in result:
                    seq = out.outputs[0]
                    new = list(seq.token_ids[sent:])
                    lps = _logprobs(new, (seq.logprobs or [])[sent:], want_logprobs)
                    if new and times.first_token_time is None:
                        times.first_token_time = time.monotonic()
                    sent += len(new)
                    self._generated += len(new)
                    if not out.finished:
                        if new:
                            yield Delta(rid, new, logprobs=lps)
                        continue
                    reason = (FinishReason.ABORT if rid in self._aborted
                              else _FINISH.get(seq.finish_reason, FinishReason.ERROR))
                    error = None if reason is not FinishReason.ERROR else (
                        f"TensorRT-LLM finished with reason {seq.finish_reason!r}")
                    finished = True
                    yield self._final(rid, new, lps, reason, num_prompt, sent, seq, error,
                                      times)
                    return
                error = "the TensorRT-LLM stream ended before the request finished"
            except Exception as exc:  # a request error from the runtime ends this stream only
                log.exception("TensorRT-LLM request %s failed", rid)
                error = f"engine failure: {exc}"
            finished = True
            yield self._final(rid, [], None, FinishReason.ERROR, num_prompt, sent, None, error,
                              times)
        finally:
            if not finished:  # the caller left early (cancel, aclose, error)
                self.abort(rid)
            if self._requests.get(rid) is result:
                del self._requests[rid]
                self._aborted.discard(rid)

    def _final(self, rid: str, new: list[int], lps: list[TokenLogprob] | None,
               reason: FinishReason, num_prompt: int, num_out: int, seq: Any,
               error: str | None, times: _StreamTimes) -> Delta:
        # The LLM API has no cached-token count on the output; per-request perf metrics
        # report reused KV blocks, so cached tokens = reused blocks * block size (capped).
        metrics = getattr(seq, "request_perf_metrics", None)
        reused = getattr(getattr(metrics, "kv_cache_metrics", None), "num_reused_blocks", 0)
        cached = min(num_prompt, int(reused or 0) * self.config.block_size)
        self._requests.pop(rid, None)  # the id is free again once the final delta is out
        self._aborted.discard(rid)
        self._num_finished += 1
        self._cache_queries += num_prompt
        self._cache_hits += cached
        return Delta(rid, new, finish_reason=reason, logprobs=lps, error=error,
                     usage=Usage(prompt_tokens=num_prompt, completion_tokens=num_out,
                                 cached_prompt_tokens=cached),
                     timings=self._timings(times))

    def _timings(self, times: _StreamTimes) -> RequestTimings:
        """What the stream saw. Approximate, unlike the native engine's: the runtime's
        queue is not visible, so ``queue_s`` is 0 and its wait counts as prefill; stages
        end when the LLM API hands tokens over (after its own postprocessing); and the
        device share is equal among the requests of an iteration (not per token),
        counts iterations while the request was still queued, and lags by the stats
        poll (``STATS_POLL_S``), so a request shorter than that may show 0."""
        finished = time.monotonic()
        first_token = times.first_token_time if times.first_token_time is not None else finished
        return RequestTimings(
            arrival_time=times.arrival_time, queue_s=0.0,
            prefill_s=first_token - times.arrival_time, decode_s=finished - first_token,
            device_seconds=self._device_seconds_per_request - times.device_share_at_arrival)

    def abort(self, request_id: str) -> None:
        """Cancel a request; its stream ends with FinishReason.ABORT. Unknown ids are ignored."""
        result = self._requests.get(request_id)
        if result is None or result.finished or request_id in self._aborted:
            return
        self._aborted.add(request_id)
        try:
            result.abort()  # the runtime answers with a final 'cancelled' output
        except Exception:
            log.exception("aborting TensorRT-LLM request %s failed", request_id)

    # -- stats -----------------------------------------------------------------------

    async def _poll_stats(self) -> None:
        while not self._closed:
            try:
                async for it in self._llm.get_stats_async(timeout=STATS_TIMEOUT_S):
                    self._last_iter = it
                    ifb = it.get("inflightBatchingStats") or {}
                    num_scheduled = int(ifb.get("numScheduledRequests",
                                                it.get("numActiveRequests", 0)))
                    iter_s = float(it.get("iterLatencyMS", 0.0)) / 1e3
                    self._recent_batch.append(num_scheduled)
                    self._recent_ms.append(iter_s * 1e3)
                    self._device_seconds += iter_s
                    self._device_seconds_per_request += iter_s / max(num_scheduled, 1)
            except Exception:
                log.debug("get_stats_async failed", exc_info=True)
            await asyncio.sleep(STATS_POLL_S)

    def stats(self) -> EngineStats:
        """The latest iteration stats of the runtime plus counts kept here."""
        it, kv = self._last_iter, self._last_iter.get("kvCacheStats") or {}
        batches, ms = list(self._recent_batch), list(self._recent_ms)
        return EngineStats(
            num_running=int(it.get("numActiveRequests", 0)),
            num_waiting=int(it.get("numQueuedRequests", 0)),
            num_kv_blocks_total=int(kv.get("maxNumBlocks", 0)),
            num_kv_blocks_free=int(kv.get("freeNumBlocks", 0)),
            num_kv_blocks_cached=0,  # not reported by TensorRT-LLM
            prefix_cache_queries=self._cache_queries,
            prefix_cache_hits=self._cache_hits,
            num_preemptions=0,  # not reported by TensorRT-LLM
            num_steps=int(it.get("iter", -1)) + 1,
            num_finished=self._num_finished,
            generated_tokens=self._generated,
            mean_batch_size=sum(batches) / len(batches) if batches else 0.0,
            mean_step_ms=sum(ms) / len(ms) if ms else 0.0,
            device_seconds=self._device_seconds,
            recent_batch_sizes=batches,
        )

    def shutdown(self, timeout: float = 5.0) -> None:
        """Abort what is in flight and release the GPU; ``timeout`` is unused."""
        self._closed = True
        for rid in list(self._requests):
            self.abort(rid)
        if self._stats_task is not None:
            loop = self._stats_task.get_loop()
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._stats_task.cancel)
        self._llm.shutdown()


@dataclass(slots=True)
class _StreamTimes:
    """One request's times as its stream sees them (``time.monotonic`` seconds)."""

    arrival_time: float
    device_share_at_arrival: float  # ``_device_seconds_per_request`` at arrival
    first_token_time: float | None = None


def _logprobs(tokens: list[int], entries: list[Any], k: int) -> list[TokenLogprob] | None:
    """Map TensorRT-LLM's per-token ``{token_id: Logprob}`` dicts to TokenLogprob."""
    if not k or not tokens or len(entries) < len(tokens):
        return None
    out = []
    for token, entry in zip(tokens, entries, strict=False):
        ranked = sorted(entry.items(), key=lambda kv: -kv[1].logprob)
        top = tuple((int(t), float(lp.logprob)) for t, lp in ranked[:k])
        own = entry.get(token)
        out.append(TokenLogprob(token, float(own.logprob) if own else float("nan"), top))
    return out


def _refuse_unmapped(p: SamplingParams) -> None:
    """The knobs this adapter does not pass to TensorRT-LLM yet are refused, naming the
    field, rather than silently ignored."""
    unmapped = {
        "presence_penalty": p.presence_penalty != 0.0,
        "frequency_penalty": p.frequency_penalty != 0.0,
        "logit_bias": bool(p.logit_bias),
        "min_tokens": p.min_tokens != 0,
        "constraint": p.constraint is not None,
    }
    for name, is_set in unmapped.items():
        if is_set:
            raise InvalidRequestError(name, "is not supported by the tensorrt_llm backend yet")
