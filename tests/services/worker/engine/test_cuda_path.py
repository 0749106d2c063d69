"""The CUDA path of the engine: Triton kernels, the persistent batch and the padded
static-buffer decode that CUDA graphs capture.

On a CPU the same path runs with the Triton kernels under TRITON_INTERPRET=1 and the
decode graphs replayed eagerly (nothing to capture): its greedy tokens must equal the
plain torch engine's. The ``gpu`` tests run the captured graphs on a real device
(scripts/device) and are skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from services.worker.engine.core import EngineCore
from services.worker.engine.model.cuda_graphs import batch_size_ladder
from services.worker.engine.params import SamplingParams
from tests.services.worker.engine.helpers import run_core, tiny_core

triton = pytest.importorskip("triton")


def run_to_end(core: EngineCore, prompts: dict[str, list[int]], max_tokens: int
               ) -> dict[str, list[int]]:
    """Every prompt greedy to ``max_tokens``; each one's tokens."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    deltas = run_core(core, {rid: (prompt, params) for rid, prompt in prompts.items()})
    return {rid: [t for d in ds for t in d.new_token_ids] for rid, ds in deltas.items()}


def tiny(**overrides: object) -> EngineCore:
    return tiny_core(**{"max_num_batched_tokens": 48, **overrides})


PROMPTS = {  # lengths across block boundaries (block_size 4); b and e share a prefix
    "a": [7, 11, 13],
    "b": [21 + i for i in range(17)],
    "c": [100 + i for i in range(4)],
    "d": [300 + (i * 7) % 50 for i in range(41)],
    "e": [21 + i for i in range(12)] + [400, 401, 402],
}


def test_batch_size_ladder():
    assert batch_size_ladder(1) == [1]
    assert batch_size_ladder(8) == [1, 2, 4, 8]
    assert batch_size_ladder(40) == [1, 2, 4, 8, 16, 32, 40]
    ladder = batch_size_ladder(256)
    assert ladder[:6] == [1, 2, 4, 8, 16, 32] and ladder[-1] == 256 and len(ladder) == 20


def test_triton_kernels_and_padded_static_decode_give_the_torch_engines_tokens():
    plain = tiny(use_triton=False, cuda_graphs=False)
    fast = tiny(use_triton=True, cuda_graphs=True, cuda_graph_max_batch_size=8)
    assert fast.runner.graphs is not None and fast.runner.model.ops.prefill_attention
    # Chunked prefills (48-token budget), a cached prefix (e after b), batches of 1..5
    # decodes padded to 1, 2, 4 or 8 rows.
    first = {k: PROMPTS[k] for k in "abcd"}
    want = run_to_end(plain, first, max_tokens=9)
    got = run_to_end(fast, first, max_tokens=9)
    assert got == want
    want_e = run_to_end(plain, {"e": PROMPTS["e"]}, max_tokens=6)
    assert run_to_end(fast, {"e": PROMPTS["e"]}, max_tokens=6) == want_e
    assert fast.scheduler.prefix_cache_hits > 0  # e reused b's first blocks
    stats = fast.stats()
    assert stats.cuda_graph_replays > 0
    assert stats.cuda_graph_batch_sizes == []  # nothing captured without CUDA


def test_graph_replays_pad_to_the_ladder():
    core = tiny(use_triton=True, cuda_graphs=True, cuda_graph_max_batch_size=8)
    run_to_end(core, {k: PROMPTS[k] for k in "abc"}, max_tokens=3)
    graphs = core.runner.graphs
    assert graphs is not None
    stats = graphs.stats()
    # Decode steps of 3 rows run as 4: one padding row each.
    assert stats.num_replays >= 1 and stats.num_padded_rows == stats.num_replays


REPEATING = {  # phrases that recur, so that n-gram lookup proposes drafts
    "r": [5, 9] + [31, 32, 33, 34, 35] * 4,
    "s": [200, 201, 202, 203] * 5 + [7],
}


def test_speculative_verification_runs_in_the_graph_path_and_keeps_the_tokens():
    plain = tiny(use_triton=False, cuda_graphs=False)
    fast = tiny(use_triton=True, cuda_graphs=True, cuda_graph_max_batch_size=16,
                speculative="ngram", speculative_max_batch=4)
    want = run_to_end(plain, REPEATING, max_tokens=12)
    assert run_to_end(fast, REPEATING, max_tokens=12) == want
    stats = fast.stats()
    assert stats.spec_verifications > 0 and stats.cuda_graph_replays > 0


def test_cuda_graphs_need_the_triton_kernels():
    with pytest.raises(ValueError, match="Triton"):
        tiny(use_triton=False, cuda_graphs=True)


# -- on a GPU (scripts/device) ---------------------------------------------------------


def _cuda(**overrides: object) -> EngineCore:
    options: dict[str, object] = {"device": "cuda", "num_kv_blocks": 512, "block_size": 16,
                                  "max_num_batched_tokens": 512, "max_num_seqs": 16,
                                  "cuda_graph_max_batch_size": 16}
    options.update(overrides)
    return tiny(**options)


@pytest.mark.gpu
def test_graph_path_equals_eager_token_for_token_in_fp32():
    prompts = {k: v for k, v in PROMPTS.items() if k != "e"}
    eager = run_to_end(_cuda(cuda_graphs=False), prompts, max_tokens=24)
    graphs = _cuda(cuda_graphs=True)
    assert graphs.stats().cuda_graph_batch_sizes == [1, 2, 4, 8, 16]
    assert run_to_end(graphs, prompts, max_tokens=24) == eager
    assert graphs.stats().cuda_graph_replays > 0


@pytest.mark.gpu
def test_triton_kernels_give_the_torch_engines_tokens_on_cuda():
    prompts = {k: v for k, v in PROMPTS.items() if k != "e"}
    torch_ops = run_to_end(_cuda(use_triton=False, cuda_graphs=False), prompts, max_tokens=24)
    assert run_to_end(_cuda(use_triton=True, cuda_graphs=False), prompts,
                      max_tokens=24) == torch_ops


@pytest.mark.gpu
def test_speculation_on_cuda_gives_the_plain_tokens():
    plain = run_to_end(_cuda(), REPEATING, max_tokens=24)
    spec = _cuda(speculative="ngram")
    assert run_to_end(spec, REPEATING, max_tokens=24) == plain
    assert spec.stats().spec_accepted_tokens > 0


@pytest.mark.gpu
def test_async_scheduling_on_cuda_gives_the_synchronous_tokens():
    prompts = {k: v for k, v in PROMPTS.items() if k != "e"}
    sync = run_to_end(_cuda(async_scheduling=False), prompts, max_tokens=24)
    assert run_to_end(_cuda(async_scheduling=True), prompts, max_tokens=24) == sync


@pytest.mark.gpu
def test_graph_logits_agree_with_eager_in_bf16():
    # Synchronous steps: the prefill's token must be on the host before the decode below.
    eager = _cuda(dtype="bfloat16", cuda_graphs=False, model="smollm2-135m",
                  async_scheduling=False)
    graphs = _cuda(dtype="bfloat16", cuda_graphs=True, model="smollm2-135m",
                   async_scheduling=False)
    for core in (eager, graphs):
        core.add(core.make_request("x", list(range(100, 140)),
                                   SamplingParams(max_tokens=2, ignore_eos=True)))
        core.step()  # the prefill (eager in both)
    out = []
    for core in (eager, graphs):
        out_chunks = core.scheduler.schedule()
        tables = [core.blocks.block_ids(c.request.request_id) for c in out_chunks.chunks]
        out.append(core.runner.execute(out_chunks.chunks, tables))
    torch.testing.assert_close(out[1], out[0], rtol=2e-2, atol=2e-2)
