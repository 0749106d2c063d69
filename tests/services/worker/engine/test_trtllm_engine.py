"""TrtLlmEngine against a fake ``tensorrt_llm`` shaped like the documented 1.2 LLM API.

TensorRT-LLM itself needs NVIDIA's container and a GPU; the fake mirrors the parts the
adapter uses: ``LLM(**kwargs)``, ``SamplingParams`` (keyword-only dataclass, unknown
fields rejected), ``llmapi.KvCacheConfig``, ``LLM.generate_async(inputs, sampling_params,
streaming=True, cache_salt=...)`` returning a ``RequestOutput`` that is async-iterable,
yields itself with cumulative ``outputs[0].token_ids`` and has ``abort()``; and
``LLM.get_stats_async(timeout)`` yielding iteration-stats dicts.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from services.worker.engine.api import create_engine
from services.worker.engine.config import Backend, EngineConfig
from services.worker.engine.model.config import PRESETS
from services.worker.engine.outputs import FinishReason
from services.worker.engine.params import (
    Constraint,
    ConstraintKind,
    InvalidRequestError,
    SamplingParams,
)
from services.worker.engine.trtllm_engine import BackendUnavailableError, TrtLlmEngine

EOS = PRESETS["smollm2-135m"].eos_token_ids[0]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    p = PRESETS["smollm2-135m"]
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": p.model_type, "vocab_size": p.vocab_size, "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size, "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_heads, "num_key_value_heads": p.num_kv_heads,
        "max_position_embeddings": p.max_position_embeddings, "eos_token_id": EOS,
        "tie_word_embeddings": p.tie_word_embeddings,
    }))
    return tmp_path


# -- the fake tensorrt_llm ---------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class FakeSamplingParams:
    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    logprobs: int | None = None
    ignore_eos: bool = False
    detokenize: bool = True
    return_perf_metrics: bool = False


@dataclass(slots=True, kw_only=True)
class FakeKvCacheConfig:
    enable_block_reuse: bool = True
    max_tokens: int | None = None
    free_gpu_memory_fraction: float | None = 0.9
    tokens_per_block: int = 32


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    request_perf_metrics: Any = None


class FakeRequestOutput:
    """Generates ``script`` one token per step; stops like the runtime does."""

    def __init__(self, request_id: int, prompt: list[int], sp: FakeSamplingParams,
                 script: list[int], reused_blocks: int) -> None:
        self.request_id, self.prompt_token_ids, self._sp = request_id, prompt, sp
        self.outputs = [CompletionOutput(0)]
        self._script, self._reused, self._done, self.aborted = script, reused_blocks, False, False

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        self.aborted = True

    def __aiter__(self) -> FakeRequestOutput:
        return self

    async def __anext__(self) -> FakeRequestOutput:
        if self._done:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        out = self.outputs[0]
        if self.aborted:
            out.finish_reason, self._done = "cancelled", True
            return self
        token = self._script[len(out.token_ids) % len(self._script)]
        out.token_ids.append(token)
        if self._sp.logprobs:
            out.logprobs.append({token: Logprob(-0.5, 1), 7: Logprob(-1.5, 2), 8: Logprob(-3.0, 3)})
        if token in (self._sp.stop_token_ids or []) or (
                token == self._sp.end_id and not self._sp.ignore_eos):
            out.finish_reason, self._done = "stop", True
        elif len(out.token_ids) >= self._sp.max_tokens:
            out.finish_reason, self._done = "length", True
        if self._done and self._sp.return_perf_metrics:
            out.request_perf_metrics = types.SimpleNamespace(
                kv_cache_metrics=types.SimpleNamespace(num_reused_blocks=self._reused))
        return self


class FakeLLM:
    instances: ClassVar[list[FakeLLM]] = []
    script: ClassVar[list[int]] = [11, 12, 13, 14, 15]
    reused_blocks: ClassVar[int] = 0

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.model, self.kwargs = model, kwargs
        self.calls: list[tuple[list[int], FakeSamplingParams, dict[str, Any]]] = []
        self.results: list[FakeRequestOutput] = []
        self.shut = False
        FakeLLM.instances.append(self)

    def generate_async(self, inputs: list[int], sampling_params: FakeSamplingParams | None = None,
                       streaming: bool = False, cache_salt: str | None = None) -> FakeRequestOutput:
        assert streaming
        self.calls.append((inputs, sampling_params, {"cache_salt": cache_salt}))
        result = FakeRequestOutput(len(self.results), inputs, sampling_params, self.script,
                                   self.reused_blocks)
        self.results.append(result)
        return result

    async def get_stats_async(self, timeout: float | None = 2) -> Any:
        yield {"iter": 41, "iterLatencyMS": 3.5, "numActiveRequests": 2, "numQueuedRequests": 1,
               "inflightBatchingStats": {"numScheduledRequests": 2},
               "kvCacheStats": {"maxNumBlocks": 100, "freeNumBlocks": 60, "usedNumBlocks": 40,
                                "tokensPerBlock": 16, "reusedBlocks": 5, "missedBlocks": 5,
                                "cacheHitRate": 0.5}}

    def shutdown(self) -> None:
        self.shut = True


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> type[FakeLLM]:
    trt = types.ModuleType("tensorrt_llm")
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    trt.LLM, trt.SamplingParams, trt.llmapi = FakeLLM, FakeSamplingParams, llmapi
    llmapi.KvCacheConfig = FakeKvCacheConfig
    monkeypatch.setitem(sys.modules, "tensorrt_llm", trt)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", llmapi)
    monkeypatch.setattr(FakeLLM, "instances", [])
    monkeypatch.setattr(FakeLLM, "script", [11, 12, 13, 14, 15])
    monkeypatch.setattr(FakeLLM, "reused_blocks", 0)
    return FakeLLM


def make_engine(model_dir: Path, **overrides: Any) -> TrtLlmEngine:
    return TrtLlmEngine(EngineConfig(model=str(model_dir), backend=Backend.TENSORRT_LLM,
                                     **overrides))


async def collect(stream: Any) -> list[Any]:
    return [d async for d in stream]


# -- without TensorRT-LLM ----------------------------------------------------------------


def test_missing_tensorrt_llm_raises_helpful_error(monkeypatch, model_dir):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # makes the import fail
    config = EngineConfig(model=str(model_dir), backend=Backend.TENSORRT_LLM)
    for build in (TrtLlmEngine, create_engine):
        with pytest.raises(BackendUnavailableError) as err:
            build(config)
        msg = str(err.value)
        assert "not installed" in msg and "container" in msg and "backend=native" in msg
        assert isinstance(err.value, RuntimeError)


# -- with the fake -----------------------------------------------------------------------


def test_constructor_maps_engine_config(fake_trt, model_dir):
    eng = make_engine(model_dir, dtype="bf16", block_size=32, max_num_seqs=7,
                      max_num_batched_tokens=256, enable_prefix_caching=False,
                      num_kv_blocks=50, max_model_len=1024)
    llm = fake_trt.instances[-1]
    assert llm.model == str(model_dir)
    kw = llm.kwargs
    assert kw["dtype"] == "bfloat16" and kw["max_batch_size"] == 7
    assert kw["max_num_tokens"] == 256 and kw["max_seq_len"] == 1024
    assert kw["skip_tokenizer_init"] and kw["enable_iter_perf_stats"]
    kv = kw["kv_cache_config"]
    assert (kv.enable_block_reuse, kv.tokens_per_block, kv.max_tokens) == (False, 32, 50 * 32)
    assert eng.max_model_len == 1024 and eng.vocab_size == PRESETS["smollm2-135m"].vocab_size
    eng.shutdown()
    assert llm.shut


def test_stream_yields_only_new_tokens_and_usage(fake_trt, model_dir):
    fake_trt.reused_blocks = 1  # one 16-token block of the prompt came from the cache

    async def run() -> list[Any]:
        eng = make_engine(model_dir)
        deltas = await collect(eng.submit(list(range(1, 21)), SamplingParams(max_tokens=4),
                                          request_id="r1", cache_salt="s"))
        await asyncio.sleep(0)  # let the stats poller take its first snapshot
        return [eng, deltas]

    eng, deltas = asyncio.run(run())
    assert [d.new_token_ids for d in deltas] == [[11], [12], [13], [14]]
    assert all(d.request_id == "r1" for d in deltas)
    assert [d.finish_reason for d in deltas] == [None, None, None, FinishReason.LENGTH]
    usage = deltas[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens) == (20, 4, 16)
    assert fake_trt.instances[-1].calls[0][2] == {"cache_salt": "s"}
    stats = eng.stats()
    assert (stats.num_kv_blocks_total, stats.num_kv_blocks_free) == (100, 60)
    assert (stats.num_running, stats.num_waiting, stats.num_steps) == (2, 1, 42)
    assert (stats.num_finished, stats.generated_tokens) == (1, 4)
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (20, 16)
    assert stats.mean_step_ms == 3.5 and stats.mean_batch_size == 2.0



def test_final_delta_has_timings_measured_at_the_stream(fake_trt, model_dir):
    async def run() -> tuple[TrtLlmEngine, list[Any], float, float]:
        eng = make_engine(model_dir)
        before = time.monotonic()
        deltas = await collect(eng.submit([1, 2, 3], SamplingParams(max_tokens=3)))
        return eng, deltas, before, time.monotonic()

    eng, deltas, before, after = asyncio.run(run())
    timings = deltas[-1].timings
    assert all(d.timings is None for d in deltas[:-1])
    assert timings.queue_s == 0.0  # the runtime's queue is not visible: it counts as prefill
    assert before <= timings.arrival_time <= timings.finished_time <= after
    assert timings.prefill_s >= 0 and timings.decode_s >= 0
    # The one iteration the fake reports (3.5 ms, 2 requests) ran while this one was in
    # flight: an equal half of it.
    assert timings.device_seconds == pytest.approx(0.00175)
    assert eng.stats().device_seconds == pytest.approx(0.0035)

def test_sampling_params_mapping(fake_trt, model_dir):
    async def run() -> None:
        eng = make_engine(model_dir, max_model_len=64)
        greedy = SamplingParams(max_tokens=500, stop_token_ids=(13,))
        sampled = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05,
                                 repetition_penalty=1.2, seed=42, ignore_eos=True, logprobs=2)
        deltas = await collect(eng.submit([1, 2, 3, 4], greedy))
        await collect(eng.submit([1, 2], sampled))
        await collect(eng.submit([1, 2], SamplingParams(temperature=1.0)))
        assert deltas[-1].finish_reason is FinishReason.STOP
        assert deltas[-1].new_token_ids == [13]  # stop tokens stay in the output

    asyncio.run(run())
    g, s, unseeded = (call[1] for call in fake_trt.instances[-1].calls)
    assert g.max_tokens == 60  # capped at the context left, so the end is LENGTH as natively
    assert (g.temperature, g.top_k, g.top_p, g.min_p, g.seed) == (None, 1, None, None, None)
    assert g.end_id == EOS and not g.ignore_eos and g.stop_token_ids == [13]
    assert g.include_stop_str_in_output and not g.detokenize and g.return_perf_metrics
    assert g.repetition_penalty is None and g.logprobs is None
    assert (s.temperature, s.top_k, s.top_p, s.min_p) == (0.7, 20, 0.9, 0.05)
    assert (s.repetition_penalty, s.seed, s.ignore_eos, s.logprobs) == (1.2, 42, True, 2)
    assert (unseeded.temperature, unseeded.top_k, unseeded.top_p) == (1.0, 0, 1.0)
    assert isinstance(unseeded.seed, int)  # seed=None means random, not the runtime's fixed 0


def test_logprobs_are_mapped(fake_trt, model_dir):
    async def run() -> list[Any]:
        eng = make_engine(model_dir)
        return await collect(eng.submit([1, 2], SamplingParams(max_tokens=2, logprobs=2)))

    deltas = asyncio.run(run())
    lp = deltas[0].logprobs[0]
    assert (lp.token_id, lp.logprob, lp.top) == (11, -0.5, ((11, -0.5), (7, -1.5)))


def test_eos_stops_and_stop_token_ids_are_passed_on(fake_trt, model_dir):
    fake_trt.script = [11, EOS, 12]

    async def run() -> list[Any]:
        eng = make_engine(model_dir)
        return await collect(eng.submit([1], SamplingParams(stop_token_ids=(99,))))

    deltas = asyncio.run(run())
    assert deltas[-1].finish_reason is FinishReason.STOP
    assert fake_trt.instances[-1].calls[0][1].stop_token_ids == [99]


def test_abort_ends_stream_with_abort(fake_trt, model_dir):
    async def run() -> list[Any]:
        eng = make_engine(model_dir)
        stream = eng.submit([1, 2], SamplingParams(max_tokens=100), request_id="a")
        first = await anext(stream)
        eng.abort("a")
        eng.abort("unknown")  # ignored
        rest = await collect(stream)
        assert "a" not in eng._requests
        return [first, *rest]

    deltas = asyncio.run(run())
    assert deltas[-1].finish_reason is FinishReason.ABORT
    assert deltas[-1].usage.completion_tokens == sum(len(d.new_token_ids) for d in deltas)
    assert fake_trt.instances[-1].results[0].aborted


def test_leaving_early_aborts_the_request(fake_trt, model_dir):
    async def run() -> TrtLlmEngine:
        eng = make_engine(model_dir)
        stream = eng.submit([1, 2], SamplingParams(max_tokens=100), request_id="x")
        await anext(stream)
        await stream.aclose()
        return eng

    eng = asyncio.run(run())
    assert fake_trt.instances[-1].results[0].aborted
    assert eng._requests == {}


def test_request_id_is_free_after_the_final_delta(fake_trt, model_dir):
    async def run() -> None:
        eng = make_engine(model_dir)
        stream = eng.submit([1], SamplingParams(max_tokens=1), request_id="dup")
        async for delta in stream:
            if delta.finished:
                break  # the generator is left suspended, as a servicer would
        await collect(eng.submit([1], SamplingParams(max_tokens=1), request_id="dup"))
        running = eng.submit([1], SamplingParams(max_tokens=5), request_id="busy")
        with pytest.raises(InvalidRequestError, match="already running"):
            eng.submit([1], SamplingParams(), request_id="busy")
        await collect(running)

    asyncio.run(run())


@pytest.mark.parametrize(("prompt", "params", "field_name"), [
    ([], SamplingParams(), "prompt_ids"),
    ([1] * 8192, SamplingParams(), "prompt_ids"),
    ([10**6], SamplingParams(), "prompt_ids"),
    ([1], SamplingParams(temperature=-1.0), "temperature"),
    ([1], SamplingParams(top_p=0.0), "top_p"),
    ([1], SamplingParams(max_tokens=0), "max_tokens"),
    ([1], SamplingParams(stop_token_ids=(10**6,)), "stop_token_ids"),
    ([1], SamplingParams(logprobs=21), "logprobs"),
    # Knobs the adapter does not map yet are refused, not ignored.
    ([1], SamplingParams(presence_penalty=0.5), "presence_penalty"),
    ([1], SamplingParams(logit_bias=((5, 1.0),)), "logit_bias"),
    ([1], SamplingParams(min_tokens=2), "min_tokens"),
    ([1], SamplingParams(constraint=Constraint(ConstraintKind.JSON_OBJECT)), "constraint"),
])
def test_invalid_input_raises_before_queueing(fake_trt, model_dir, prompt, params, field_name):
    async def run() -> None:
        eng = make_engine(model_dir)
        with pytest.raises(InvalidRequestError) as err:
            eng.submit(prompt, params)
        assert err.value.field == field_name

    asyncio.run(run())
    assert fake_trt.instances[-1].calls == []


def test_runtime_value_error_becomes_invalid_request(fake_trt, model_dir, monkeypatch):
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ValueError("The sum of prompt length and max_tokens exceeds max_seq_len")

    async def run() -> None:
        eng = make_engine(model_dir)
        monkeypatch.setattr(fake_trt.instances[-1], "generate_async", refuse)
        with pytest.raises(InvalidRequestError, match="max_seq_len"):
            eng.submit([1], SamplingParams())

    asyncio.run(run())


def test_shutdown_refuses_new_work(fake_trt, model_dir):
    eng = make_engine(model_dir)
    eng.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        eng.submit([1], SamplingParams())
