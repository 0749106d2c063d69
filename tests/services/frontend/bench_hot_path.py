"""The frontend's per-token cost: detokenizing remotely vs in-process, and moderating in
lock step vs pipelined vs adaptive vs in windows. Under a minute on the 2-core machine.

    .venv/bin/python -m tests.services.frontend.bench_hot_path [--json FILE] [--only TEXT]

The real tokenizer and safety services run as their own processes on loopback (their CPU
is read from /proc, not counted as the frontend's); this process runs the frontend's real
pipeline (the chain of stages ``build_pipeline`` chooses) against a fake worker stub that
streams one token id per message. Two phases per variant:

- CPU: 8 concurrent streams of 256 tokens as fast as the pipeline takes them; CPU seconds
  of this process per token (the fake worker's share is in every variant alike: compare
  with the floor, in-process detokenizing and no moderation).
- latency: 4 (then 16) streams of 128 tokens, one token every 4 ms (a decode step); per
  character, the time from the fake worker emitting the token that completed it to the
  client receiving it (p50, p90). It includes the safety service's hold-back of text
  that could still start a match (released by a later token), alike in every mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from tokenizers import Tokenizer

from genmesh.core.failure import FailureMode
from genmesh.core.models.store import ModelStore, default_store_root
from genmesh.launcher.ports import free_ports
from genmesh.v1 import (
    common_pb2,
    safety_pb2,
    safety_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
    worker_pb2,
)
from services.frontend.detokenize import LocalDetokenizers, RemoteDetokenizers
from services.frontend.events import TextChunk
from services.frontend.moderation import ModerationMode, SafetyGate, SafetySettings
from services.frontend.pipeline import Pipeline, PipelineRequest, build_pipeline

MODEL = "smollm2-135m-instruct"
TENANT = "dev"
REPO_ROOT = Path(__file__).resolve().parents[3]
TEXT = ("The lighthouse keeper climbed the spiral stairs at dusk, trimmed the wick and "
        "wound the clockwork that turned the lens. Out on the water the fishing boats "
        "came home one by one, their lanterns small against the dark swell, and she "
        "wrote the weather in the log: wind from the west, rain before midnight. ") * 8


class FakeWorkerCall:
    """One Generate stream: ``token_ids`` one per message, ``gap_s`` apart; the emit
    time of each token goes into ``emitted``."""

    def __init__(self, token_ids: list[int], gap_s: float) -> None:
        self.token_ids = token_ids
        self.gap_s = gap_s
        self.emitted: list[float] = []

    async def initial_metadata(self) -> tuple[()]:
        return ()

    def __aiter__(self) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        last = len(self.token_ids) - 1
        for n, token_id in enumerate(self.token_ids):
            await asyncio.sleep(self.gap_s)
            self.emitted.append(time.perf_counter())
            if n < last:
                yield worker_pb2.WorkerGenerateResponse(token_ids=[token_id])
            else:
                yield worker_pb2.WorkerGenerateResponse(
                    token_ids=[token_id], finish_reason=common_pb2.FINISH_REASON_LENGTH,
                    usage=common_pb2.Usage(prompt_tokens=5, completion_tokens=last + 1))

    def cancel(self) -> bool:
        return True


class FakeWorker:
    def __init__(self, token_ids: list[int], gap_s: float) -> None:
        self.token_ids = token_ids
        self.gap_s = gap_s
        self.calls: list[FakeWorkerCall] = []

    def Generate(self, request: worker_pb2.WorkerGenerateRequest, **kwargs: object
                 ) -> FakeWorkerCall:
        self.calls.append(FakeWorkerCall(self.token_ids, self.gap_s))
        return self.calls[-1]


@dataclass(frozen=True)
class Variant:
    name: str
    is_local: bool  # detokenize in-process (else the tokenizer service's stream)
    moderation: ModerationMode | None  # None: no safety service
    window_s: float = 0.02
    window_chars: int = 64
    max_in_flight: int = 1  # ADAPTIVE


VARIANTS = [
    Variant("before: remote detok + lockstep moderation", False, ModerationMode.LOCKSTEP),
    Variant("in-process detok + lockstep moderation", True, ModerationMode.LOCKSTEP),
    Variant("in-process detok + pipelined moderation", True, ModerationMode.PIPELINED),
    Variant("in-process detok + adaptive, 1 in flight", True, ModerationMode.ADAPTIVE),
    Variant("in-process detok + adaptive, 2 in flight", True, ModerationMode.ADAPTIVE,
            max_in_flight=2),
    Variant("in-process detok + window 20 ms/64 chars", True, ModerationMode.WINDOW),
    Variant("in-process detok + window 5 ms/16 chars", True, ModerationMode.WINDOW,
            window_s=0.005, window_chars=16),
    Variant("remote detok, no moderation", False, None),
    Variant("in-process detok, no moderation (floor)", True, None),
]


@dataclass
class Result:
    variant: str
    frontend_cpu_us_per_token: float = 0.0
    tokenizer_cpu_us_per_token: float = 0.0
    safety_cpu_us_per_token: float = 0.0
    lag_ms_p50: float = 0.0  # token emitted -> its text at the client
    lag_ms_p90: float = 0.0
    moderation_messages_per_token: float = 0.0
    tokens_per_s: float = 0.0  # the CPU phase's throughput (8 streams, no pacing)
    lag_ms_p50_16_streams: float = 0.0  # the latency phase with 16 streams
    lag_ms_p90_16_streams: float = 0.0
    # The 16-stream latency phase (paced like a decode step): Moderate messages and safety
    # CPU per token there, where verdicts mostly come back before the next token.
    moderation_messages_per_token_16_streams: float = 0.0
    safety_cpu_us_per_token_16_streams: float = 0.0
    notes: list[str] = field(default_factory=list)


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def ready(address: str) -> None:
    deadline = time.monotonic() + 60
    async with grpc.aio.insecure_channel(address) as channel:
        while True:
            try:
                await asyncio.wait_for(channel.channel_ready(), 1)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise


async def run_streams(pipeline: Pipeline, num_streams: int, *, tag: str
                      ) -> list[list[tuple[float, int]]]:
    """Each stream's (receive time, characters so far) per text chunk."""
    async def one(n: int) -> list[tuple[float, int]]:
        req = PipelineRequest(request_id=f"{tag}-{n}", model=MODEL, model_version="v1",
                              prompt="Tell me about lighthouses.", messages=(),
                              params=common_pb2.SamplingParams(max_tokens=4096),
                              tenant=TENANT, skip_cache=True)
        seen, num_chars = [], 0
        async for event in pipeline.run(req, timeout_s=120):
            if isinstance(event, TextChunk):
                num_chars += len(event.text)
                seen.append((time.perf_counter(), num_chars))
        return seen

    return list(await asyncio.gather(*(one(n) for n in range(num_streams))))


def char_lags_ms(received: list[tuple[float, int]], emitted: list[float],
                 char_ends: list[int]) -> list[float]:
    """Per character: receive time minus the emit time of the token completing it."""
    lags, start, k = [], 0, 0
    for at, end in received:
        for p in range(start, end):
            while char_ends[k] <= p:
                k += 1
            lags.append((at - emitted[k]) * 1000)
        start = end
    return lags


async def measure(variant: Variant, *, tokenizer: Tokenizer, token_ids: list[int],
                  char_ends: list[int], tokenizer_address: str, safety_address: str,
                  pids: dict[str, int]) -> Result:
    result = Result(variant.name)
    async with grpc.aio.insecure_channel(tokenizer_address) as tch, \
            grpc.aio.insecure_channel(safety_address) as sch:
        tokenizer_stub = tokenizer_pb2_grpc.TokenizerStub(tch)
        safety_stub = safety_pb2_grpc.SafetyStub(sch)
        counting = CountingSafety(safety_stub)
        gate = None if variant.moderation is None else SafetyGate(
            counting, SafetySettings(timeout_s=5.0, output_failure_mode=FailureMode.CLOSED,
                                     moderation_mode=variant.moderation,
                                     max_in_flight=variant.max_in_flight,
                                     window_s=variant.window_s,
                                     window_chars=variant.window_chars))
        detokenizers = (LocalDetokenizers({MODEL: tokenizer}) if variant.is_local
                        else RemoteDetokenizers(tokenizer_stub))

        def pipeline(worker: FakeWorker) -> Pipeline:
            return build_pipeline(tokenizer=tokenizer_stub,
                                  worker=worker,  # type: ignore[arg-type]
                                  rpc_timeout_s=10, detokenizers=detokenizers, safety=gate)

        await run_streams(pipeline(FakeWorker(token_ids[:16], 0)), 2, tag="warm")
        # CPU phase.
        cpu_ids = token_ids[:256]
        num_streams = 8
        counting.num_messages = 0
        before = time.process_time(), {k: proc_cpu_s(p) for k, p in pids.items()}
        started = time.perf_counter()
        await run_streams(pipeline(FakeWorker(cpu_ids, 0)), num_streams, tag="cpu")
        wall_s = time.perf_counter() - started
        after = time.process_time(), {k: proc_cpu_s(p) for k, p in pids.items()}
        num_tokens = num_streams * len(cpu_ids)
        result.tokens_per_s = num_tokens / wall_s
        result.frontend_cpu_us_per_token = (after[0] - before[0]) / num_tokens * 1e6
        result.tokenizer_cpu_us_per_token = (
            after[1]["tokenizer"] - before[1]["tokenizer"]) / num_tokens * 1e6
        result.safety_cpu_us_per_token = (
            after[1]["safety"] - before[1]["safety"]) / num_tokens * 1e6
        result.moderation_messages_per_token = counting.num_messages / num_tokens
        # Latency phase: 4 streams, then 16.
        for num_streams in (4, 16):
            worker = FakeWorker(token_ids[:128], 0.004)
            counting.num_messages = 0
            safety_before = proc_cpu_s(pids["safety"])
            streams = await run_streams(pipeline(worker), num_streams, tag="lat")
            num_tokens = num_streams * len(worker.token_ids)
            lags = [lag for call, received in zip(worker.calls, streams, strict=True)
                    for lag in char_lags_ms(received, call.emitted, char_ends)]
            if num_streams == 4:
                result.lag_ms_p50 = statistics.median(lags)
                result.lag_ms_p90 = statistics.quantiles(lags, n=10)[-1]
            else:
                result.lag_ms_p50_16_streams = statistics.median(lags)
                result.lag_ms_p90_16_streams = statistics.quantiles(lags, n=10)[-1]
                result.moderation_messages_per_token_16_streams = (
                    counting.num_messages / num_tokens)
                result.safety_cpu_us_per_token_16_streams = (
                    proc_cpu_s(pids["safety"]) - safety_before) / num_tokens * 1e6
    return result


class CountingSafety:
    """The safety stub, counting Moderate messages (requests written)."""

    def __init__(self, stub: safety_pb2_grpc.SafetyStub) -> None:
        self.stub = stub
        self.num_messages = 0

    def CheckPrompt(self, request: safety_pb2.CheckPromptRequest, **kwargs: object
                    ) -> object:
        return self.stub.CheckPrompt(request, **kwargs)  # type: ignore[arg-type]

    def Moderate(self, **kwargs: object) -> object:
        call = self.stub.Moderate(**kwargs)  # type: ignore[arg-type]
        write = call.write

        async def counted(request: safety_pb2.ModerateRequest) -> None:
            self.num_messages += 1
            await write(request)

        call.write = counted  # type: ignore[method-assign]
        return call


async def main_async(json_path: Path | None, only: str = "") -> list[Result]:
    folder = ModelStore(default_store_root()).ensure(MODEL)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    token_ids = tokenizer.encode(TEXT).ids
    # char_ends[k]: characters of decode(ids[:k + 1]); the char at p came with the first
    # token k whose char_ends[k] > p.
    char_ends = [len(tokenizer.decode(token_ids[:k + 1])) for k in range(128)]
    tport, sport = free_ports(2)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = {
        "tokenizer": subprocess.Popen(
            [sys.executable, "-m", "services.tokenizer.main", "--port", str(tport),
             "--models", MODEL, "--log-level", "WARNING"], env=env, cwd=REPO_ROOT),
        "safety": subprocess.Popen(
            [sys.executable, "-m", "services.safety.main", "--port", str(sport),
             "--embedding", "false", "--num-threads", "1", "--log-level", "WARNING"],
            env=env, cwd=REPO_ROOT),
    }
    try:
        t_addr, s_addr = f"127.0.0.1:{tport}", f"127.0.0.1:{sport}"
        await ready(t_addr)
        await ready(s_addr)
        async with grpc.aio.insecure_channel(t_addr) as ch:  # the model is loaded
            await tokenizer_pb2_grpc.TokenizerStub(ch).DescribeModel(
                tokenizer_pb2.DescribeModelRequest(model=MODEL), timeout=60)
        results = []
        for variant in [v for v in VARIANTS if only in v.name]:
            results.append(await measure(
                variant, tokenizer=tokenizer, token_ids=token_ids, char_ends=char_ends,
                tokenizer_address=t_addr, safety_address=s_addr,
                pids={k: p.pid for k, p in procs.items()}))
            r = results[-1]
            print(f"{r.variant:44s} CPU us/tok: frontend {r.frontend_cpu_us_per_token:4.0f}"
                  f" tokenizer {r.tokenizer_cpu_us_per_token:4.0f} safety "
                  f"{r.safety_cpu_us_per_token:4.0f} | {r.tokens_per_s:6.0f} tok/s | lag ms "
                  f"p50 {r.lag_ms_p50:5.2f} p90 {r.lag_ms_p90:5.2f} 16 streams p50 "
                  f"{r.lag_ms_p50_16_streams:5.2f} p90 {r.lag_ms_p90_16_streams:5.2f} | "
                  "msgs/tok "
                  f"{r.moderation_messages_per_token:.2f} (16 paced streams "
                  f"{r.moderation_messages_per_token_16_streams:.2f}, safety "
                  f"{r.safety_cpu_us_per_token_16_streams:4.0f} us/tok)", flush=True)
        if json_path is not None:
            json_path.write_text(json.dumps([asdict(r) for r in results], indent=2))
        return results
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--only", default="", help="only the variants whose name has this")
    args = parser.parse_args()
    asyncio.run(main_async(args.json, args.only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
