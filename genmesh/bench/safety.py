"""`genmesh bench safety`: how long the safety service takes.

- Prompt checks, in process: p50/p99 for 200- and 2,000-character prompts, rules only
  (normalization, prompt-injection rules behind their prefilter as the service runs them,
  lexicons, secrets, PII; and without the prefilter, to compare) and with the learned
  signals as the service runs them (up to 3 windows, 4 sentences and 3 other views packed
  into rows through all-MiniLM-L6-v2's lower layers and the fine-tuned classifier's), and
  with the exemplar signal instead (no classifier, as before it existed).
- Streamed output: the moderator's own time per chunk, and the round trip of one chunk
  through a real safety process over gRPC (what the frontend waits for per chunk).
"""

from __future__ import annotations

import contextlib
import queue
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from genmesh.launcher.ports import free_ports
from services.safety import policy as policies
from services.safety.checker import PromptChecker
from services.safety.config import DEFAULT_POLICY
from services.safety.evaluate import EVAL_FILE, load_examples
from services.safety.policy import Scanner
from services.safety.stream import StreamModerator

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class SafetyBench:
    num_prompts: int  # per length and mode
    num_chunks: int  # streamed chunks timed
    chunk_chars: int  # characters per chunk (a detokenized delta is ~4)


QUICK = SafetyBench(num_prompts=60, num_chunks=500, chunk_chars=4)
FULL = SafetyBench(num_prompts=300, num_chunks=3000, chunk_chars=4)


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    s = sorted(samples_ms)
    p99 = s[min(len(s) - 1, int(len(s) * 0.99))]
    return {"p50": round(s[len(s) // 2], 3), "p99": round(p99, 3), "n": len(s)}


def prompts(length: int, count: int, seed: int = 0) -> list[str]:
    """``count`` prompts of exactly ``length`` characters, stitched from the evaluation
    set's benign texts (close to attacks, so every scanner works; no rule settles them
    early, so the embedding always runs)."""
    texts = [e.text for e in load_examples(EVAL_FILE) if e.label == "benign"]
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        parts: list[str] = []
        while sum(len(p) + 1 for p in parts) < length:
            parts.append(rng.choice(texts))
        out.append(" ".join(parts)[:length])
    return out


def time_checks(checker: PromptChecker, policy: policies.TenantPolicy, texts: list[str]
                ) -> dict[str, float]:
    checker.check(texts[0], policy)  # warm up
    samples = []
    for text in texts:
        t0 = time.perf_counter()
        checker.check(text, policy)
        samples.append((time.perf_counter() - t0) * 1e3)
    return percentiles(samples)


def stream_text(num_chars: int) -> str:
    prose = [e.text for e in load_examples(EVAL_FILE) if e.label == "benign"]
    text = " ".join(prose)
    while len(text) < num_chars:
        text += " " + text
    return text[:num_chars]


def time_moderator(policy: policies.TenantPolicy, bench: SafetyBench) -> dict[str, float]:
    text = stream_text(bench.num_chunks * bench.chunk_chars)
    moderator = StreamModerator(policy)
    samples = []
    for i in range(0, len(text), bench.chunk_chars):
        t0 = time.perf_counter()
        moderator.feed(text[i:i + bench.chunk_chars])
        samples.append((time.perf_counter() - t0) * 1e3)
    return percentiles(samples)


@contextlib.contextmanager
def safety_process(tmp: Path) -> Iterator[str]:
    """A real safety service (rules only: streams do not use the embedding)."""
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    log = (tmp / "safety-bench.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.safety.main", "--port", str(port),
                             "--embedding", "false", "--log-level", "WARNING"],
                            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def time_service_chunks(address: str, bench: SafetyBench) -> dict[str, float]:
    """One Moderate stream in lock step, as the frontend runs it: each chunk is timed from
    its write to its reply."""
    from genmesh.v1 import safety_pb2, safety_pb2_grpc

    text = stream_text(bench.num_chunks * bench.chunk_chars)
    outbox: queue.Queue[safety_pb2.ModerateRequest | None] = queue.Queue()

    def requests() -> Iterator[safety_pb2.ModerateRequest]:
        while (msg := outbox.get(timeout=60)) is not None:
            yield msg

    samples = []
    with grpc.insecure_channel(address) as channel:
        replies = safety_pb2_grpc.SafetyStub(channel).Moderate(requests(), timeout=600)
        outbox.put(safety_pb2.ModerateRequest(request_id="bench", tenant="dev"))
        next(replies)
        for i in range(0, len(text), bench.chunk_chars):
            t0 = time.perf_counter()
            outbox.put(safety_pb2.ModerateRequest(text=text[i:i + bench.chunk_chars]))
            next(replies)
            samples.append((time.perf_counter() - t0) * 1e3)
        outbox.put(safety_pb2.ModerateRequest(flush=True))
        next(replies)
        outbox.put(None)
    return percentiles(samples)


def run_safety_bench(bench: SafetyBench, *, tmp: Path) -> dict:
    import torch

    from services.safety.classifier import load_or_train
    from services.safety.config import DEFAULT_CLASSIFIER_DIR
    from services.safety.embedding import Embedder
    from services.safety.prefilter import load_or_build

    default = policies.load(DEFAULT_POLICY).default
    rules_only = replace(default, prompt_scanners=default.prompt_scanners - {Scanner.EMBEDDING})
    # Always run the embedding, even after a rule fired, to time its full cost.
    embedding_only = replace(default, prompt_scanners=frozenset({Scanner.EMBEDDING}))
    torch.set_num_threads(2)
    embedder = Embedder.load()
    # The rules' prefilter, as the service runs it (and the rules without it, to compare).
    prefilter = load_or_build(DEFAULT_CLASSIFIER_DIR, wait=True)
    unfiltered = PromptChecker(None)
    rules = PromptChecker(None, prefilter=prefilter)
    plain = PromptChecker(embedder, prefilter=prefilter)
    # No score cache: the stitched prompts share sentences, and a cached text costs
    # nothing; what is timed is a prompt seen for the first time.
    learned = PromptChecker(embedder, load_or_train(embedder, DEFAULT_CLASSIFIER_DIR),
                            cache_texts=0, prefilter=prefilter)
    result: dict = {"torch_threads": torch.get_num_threads(),
                    "rule_prefilter": prefilter.ready.is_set(), "prompt_check_ms": {}}
    for length in (200, 2000):
        texts = prompts(length, bench.num_prompts, seed=length)
        no_prefilter = time_checks(unfiltered, rules_only, texts)
        r = time_checks(rules, rules_only, texts)
        e = time_checks(plain, embedding_only, texts)
        no_classifier = time_checks(plain, default, texts)
        both = time_checks(learned, default, texts)
        result["prompt_check_ms"][f"{length}_chars"] = {
            "rules_only": r, "rules_only_no_prefilter": no_prefilter, "embedding_only": e,
            "rules_and_embedding_no_classifier": no_classifier, "rules_and_embedding": both}
    result["stream_chunk_ms"] = {"chunk_chars": bench.chunk_chars,
                                 "moderator_in_process": time_moderator(default, bench)}
    with safety_process(tmp) as address:
        result["stream_chunk_ms"]["round_trip_over_grpc"] = time_service_chunks(address, bench)
    targets = result["prompt_check_ms"]
    result["targets"] = {
        "rules_only_p99_le_5ms": all(targets[k]["rules_only"]["p99"] <= 5 for k in targets),
        "with_embedding_p99_le_40ms": all(targets[k]["rules_and_embedding"]["p99"] <= 40
                                          for k in targets),
        "chunk_p50_le_1ms": result["stream_chunk_ms"]["round_trip_over_grpc"]["p50"] <= 1.0,
    }
    return result
