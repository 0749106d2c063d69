"""The response cache's key: what changes an answer is in it, what does not is not."""

from __future__ import annotations

from genmesh.v1 import common_pb2
from services.frontend.response_cache import cache_key


def key(**params: object) -> bytes:
    return cache_key(tenant="t", model="m", version="v1", prompt_ids=[1, 2],
                     params=common_pb2.SamplingParams(**params)).SerializeToString()  # type: ignore[arg-type]


def test_greedy_answers_are_shared_whatever_the_seed_or_speculation():
    assert key() == key(seed=3) == key(speculative=True) == key(speculative=False)


def test_seeded_samples_are_shared_with_and_without_speculation():
    # Speculation keeps a seed's draws (sampler.launch_verify): the same answer.
    assert key(temperature=0.7, seed=3) == key(temperature=0.7, seed=3, speculative=True)
    assert key(temperature=0.7, seed=3) != key(temperature=0.7, seed=4)
