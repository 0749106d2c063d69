"""Shared fixtures and helpers: the repository's policy, a policy written by a test, and
timing that tolerates a descheduled run."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from services.safety import policy as policies
from services.safety.config import DEFAULT_CLASSIFIER_DIR, DEFAULT_POLICY
from services.safety.policy import PolicySet


@pytest.fixture(scope="session")
def real_classifier() -> Path:
    """The injection classifier in the user's cache, where the service looks for it:
    trained here when missing or stale (a fresh clone: ~2 min on two cores, once), so that a
    safety process a test starts does not spend its start-up deadline training it."""
    from services.safety.classifier import artifact_key, artifact_path, load_or_train
    from services.safety.embedding import Embedder
    from services.safety.prefilter import load_or_build

    embedder = Embedder.load()
    load_or_train(embedder, DEFAULT_CLASSIFIER_DIR)
    load_or_build(DEFAULT_CLASSIFIER_DIR, wait=True)  # the rules' prefilter, cached beside it
    return artifact_path(DEFAULT_CLASSIFIER_DIR, artifact_key(embedder))


@pytest.fixture(scope="session")
def repo_policies() -> PolicySet:
    return policies.load(DEFAULT_POLICY)


def write_policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def best_of_three(scan: Callable[[], object]) -> float:
    """Seconds for the fastest of three runs, so one descheduling does not fail a test."""
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        scan()
        timings.append(time.perf_counter() - started)
    return min(timings)
