"""Shared fixtures: the repository's policy, and a small policy written by a test."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.safety import policy as policies
from services.safety.config import DEFAULT_POLICY
from services.safety.policy import PolicySet


@pytest.fixture(scope="session")
def repo_policies() -> PolicySet:
    return policies.load(DEFAULT_POLICY)


def write_policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path
