"""The grammar's cost per decode step, constrained vs free, at batch 1 and 32. About a
minute on the 2-core machine.

    .venv/bin/python -m tests.services.worker.engine.bench_grammar [--json FILE]

Two measurements, both on the default model's tokenizer (49,152 tokens):

- sampler: one step's host work for the constrained rows (the matchers' masks, then
  advancing them by the step's tokens) and the sampler with and without the mask
  applied, on fixed logits. The matchers walk valid JSON under the ten test schemas
  (a fresh walk once one ends), so every mask is one a real decode would compute.
- engine: decode steps of the real model (bf16, CPU), B requests under JSON schemas vs
  B free requests; the mean wall time of a decode step and of its sampling phase
  (masks, sampler, read-back; its mean, from the engine's stats) over steps where all B
  requests are decoding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from genmesh.core.models.store import ModelStore, default_store_root
from services.worker.engine.config import EngineConfig
from services.worker.engine.core import STATS_WINDOW, EngineCore
from services.worker.engine.params import Constraint, ConstraintKind, SamplingParams
from services.worker.engine.request import Request
from services.worker.engine.sampler import Sampler
from services.worker.engine.structured_output import StructuredOutput
from tests.services.worker.engine.json_schemas import INSTANCES, SCHEMAS

MODEL = "smollm2-135m-instruct"
EOS = 2
NUM_SAMPLER_STEPS = 200
NUM_ENGINE_STEPS = 30
NUM_ENGINE_REPEATS = 3


def constraint(name: str) -> Constraint:
    return Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMAS[name]))


def bench_sampler(tokenizer_file: Path, batch: int) -> dict[str, float]:
    """Median ms per step: mask, sampler with and without it, advancing the matchers."""
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    vocab = tokenizer.get_vocab_size()
    names = [list(SCHEMAS)[i % len(SCHEMAS)] for i in range(batch)]
    walks = [tokenizer.encode(json.dumps(INSTANCES[n])).ids for n in names]
    so = StructuredOutput(tokenizer_file, vocab_size=vocab, eos_token_ids=(EOS,))
    generation = [0] * batch

    def start(i: int) -> str:
        rid = f"r{i}-{generation[i]}"
        so.start(rid, constraint(names[i]))
        while so.num_building:
            so.wait(1.0)
            so.take_ready()
        return rid

    ids = [start(i) for i in range(batch)]
    positions = [i % 5 for i in range(batch)]  # rows at different points of their walks
    for i in range(batch):
        for t in walks[i][:positions[i]]:
            so.accept(ids[i], t)
    requests = [Request(request_id=r, prompt_ids=[1], params=SamplingParams()) for r in ids]
    logits = torch.randn(batch, vocab)
    sampler = Sampler(torch.device("cpu"), eos_token_ids=(EOS,))
    times: dict[str, list[float]] = {"mask": [], "sample_masked": [], "sample_free": [],
                                     "accept": []}
    for _ in range(NUM_SAMPLER_STEPS):
        t0 = time.perf_counter()
        bitmask = so.bitmask([r.request_id for r in requests])
        t1 = time.perf_counter()
        sampler.sample(logits, requests, bitmask=bitmask)
        t2 = time.perf_counter()
        sampler.sample(logits, requests)
        t3 = time.perf_counter()
        for i in range(batch):  # the walk's next token, as if the sampler had picked it
            assert so.accept(ids[i], walks[i][positions[i]])
            positions[i] += 1
        t4 = time.perf_counter()
        for i in range(batch):
            if positions[i] == len(walks[i]):  # a new generation under the same schema
                so.release(ids[i])
                generation[i] += 1
                ids[i] = start(i)
                requests[i] = Request(request_id=ids[i], prompt_ids=[1], params=SamplingParams())
                positions[i] = 0
        for key, seconds in (("mask", t1 - t0), ("sample_masked", t2 - t1),
                             ("sample_free", t3 - t2), ("accept", t4 - t3)):
            times[key].append(seconds * 1e3)
    result = {f"{k}_ms": round(statistics.median(v), 3) for k, v in times.items()}
    result["grammar_ms"] = round(result["mask_ms"] + result["sample_masked_ms"]
                                 - result["sample_free_ms"] + result["accept_ms"], 3)
    return result


def bench_engine(model_dir: Path, batch: int, *, constrained: bool) -> dict[str, float]:
    core = EngineCore(EngineConfig(model=str(model_dir), dtype="bfloat16",
                                   num_kv_blocks=1024, max_num_seqs=64,
                                   max_num_batched_tokens=2048))
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    names = [list(SCHEMAS)[i % len(SCHEMAS)] for i in range(batch)]
    for i, name in enumerate(names):
        prompt = tokenizer.encode(f"<|im_start|>user\nFour examples of a {name}, as a JSON "
                                  "list.<|im_end|>\n<|im_start|>assistant\n").ids
        if constrained:
            # A list of at least 4: every output is long enough to decode through the run.
            schema = {"type": "array", "minItems": 4, "maxItems": 6, "items": SCHEMAS[name]}
            params = SamplingParams(max_tokens=512, temperature=0.7, seed=i,
                                    constraint=Constraint(ConstraintKind.JSON_SCHEMA,
                                                          json.dumps(schema)))
        else:
            params = SamplingParams(max_tokens=512, temperature=0.7, seed=i, ignore_eos=True)
        core.add(core.make_request(f"r{i}", prompt, params))
    while core.structured.num_building or core.stats().num_steps == 0:  # grammars, prefill
        core.step()
    before = core.stats()
    assert before.num_steps + NUM_ENGINE_STEPS <= STATS_WINDOW  # the stats' means cover all
    steps = []
    for _ in range(NUM_ENGINE_STEPS):
        t0 = time.perf_counter()
        deltas = core.step()
        steps.append((time.perf_counter() - t0) * 1e3)
        assert len(deltas) == batch and not any(d.finished for d in deltas), "batch shrank"
    after = core.stats()
    # The sampling phase's mean over these steps, from the means over all steps so far.
    sample_ms = (after.mean_sample_ms * after.num_steps
                 - before.mean_sample_ms * before.num_steps) / NUM_ENGINE_STEPS
    for i in range(batch):
        core.abort(f"r{i}")
    return {"step_ms_median": round(statistics.median(steps), 2),
            "step_ms_mean": round(statistics.mean(steps), 2),
            "sample_ms_mean": round(sample_ms, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model_dir = ModelStore(default_store_root()).ensure(MODEL)
    results: dict[str, dict[str, dict[str, float]]] = {"sampler": {}, "engine": {}}
    for batch in (1, 32):
        results["sampler"][f"batch_{batch}"] = bench_sampler(model_dir / "tokenizer.json",
                                                             batch)
        print(f"sampler batch {batch}: {results['sampler'][f'batch_{batch}']}", flush=True)
    # The machine is shared and noisy: free and constrained runs alternate, and each
    # figure is the median over the repetitions.
    runs: dict[str, list[dict[str, float]]] = {}
    for _ in range(NUM_ENGINE_REPEATS):
        for batch in (1, 32):
            for constrained in (False, True):
                key = f"batch_{batch}_{'constrained' if constrained else 'free'}"
                runs.setdefault(key, []).append(
                    bench_engine(model_dir, batch, constrained=constrained))
    for key, reps in runs.items():
        results["engine"][key] = {name: round(statistics.median(r[name] for r in reps), 3)
                                  for name in reps[0]}
        print(f"engine {key}: {results['engine'][key]}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
