"""Plans of `genmesh bench engine` and their command-line flags."""

from __future__ import annotations

import argparse

import pytest

from genmesh.bench.engine import FULL, GPU, QUICK, make_plan, parse_concurrency
from genmesh.commands import bench


def test_named_plans():
    assert make_plan("full") is FULL
    assert make_plan("quick") is QUICK
    assert make_plan("gpu") is GPU
    assert GPU.concurrency == (1, 64, 256)
    assert GPU.hf_batch_size == max(GPU.concurrency)  # HF's batch is as large as the top
    assert GPU.hf_one_at_a_time == 2
    assert (GPU.min_prompt_len, GPU.max_prompt_len, GPU.output_len) == (20, 500, 128)


def test_concurrency_overrides_the_plan_and_the_hf_batch_follows_the_top_level():
    plan = make_plan("quick", concurrency="64,1, 256,64")
    assert plan.concurrency == (1, 64, 256)
    assert plan.hf_batch_size == 256
    assert plan.output_len == QUICK.output_len  # the rest is the named plan's
    assert make_plan("full", concurrency=[8, 2]).concurrency == (2, 8)
    assert make_plan("gpu", concurrency="1,64", hf_batch_size=32).hf_batch_size == 32


@pytest.mark.parametrize("text", ["", "0,4", "-1", "a,b", "1.5", ","])
def test_bad_concurrency_is_refused(text):
    with pytest.raises(ValueError, match="--concurrency"):
        parse_concurrency(text)


def test_unknown_plan_and_bad_hf_batch_are_refused():
    with pytest.raises(ValueError, match="unknown plan"):
        make_plan("huge")
    with pytest.raises(ValueError, match="HF batch"):
        make_plan("quick", hf_batch_size=0)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", "engine", *argv])


def test_engine_flags_parse():
    args = _parse("--device", "cuda", "--dummy", "--model", "llama-3-8b", "--plan", "gpu",
                  "--concurrency", "1,64,256", "--max-num-seqs", "256",
                  "--max-num-batched-tokens", "4096", "--no-profile")
    assert (args.plan, args.concurrency, args.max_num_seqs) == ("gpu", "1,64,256", 256)
    assert args.max_num_batched_tokens == 4096 and args.no_profile and args.dummy
    quick = _parse("--quick")
    assert quick.quick and quick.plan is None and quick.kv_cache_gib is None
    with pytest.raises(SystemExit):
        _parse("--plan", "huge")
