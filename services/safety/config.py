"""The safety service's configuration, read once at the entry point."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from genmesh.core.config import ServerConfig

DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "deploy" / "safety" / "policy.yaml"
DEFAULT_CLASSIFIER_DIR = Path.home() / ".cache" / "genmesh" / "safety"


@dataclass(frozen=True, slots=True)
class SafetyConfig(ServerConfig):
    SERVICE: ClassVar[str] = "safety"
    DESCRIPTION: ClassVar[str] = "the safety service"

    port: int = 50053
    policy_file: str = str(DEFAULT_POLICY)  # per-tenant policy (YAML)
    # The learned prompt-injection signal (all-MiniLM-L6-v2, ~90 MB, ~3 s to load).
    # Off: rules only, for tenants whose policy names the embedding scanner too.
    embedding: bool = True
    # The injection classifier (layers of the embedding model fine-tuned:
    # services/safety/classifier.py): its weights are cached here, keyed by a hash of its
    # data and code; a missing or stale file is trained at start (minutes on two cores:
    # `genmesh safety train` builds it ahead, as make run/test and the image do). Off:
    # rules and exemplar similarity; with the embedding off: rules only.
    classifier: bool = True
    classifier_cache_dir: str = str(DEFAULT_CLASSIFIER_DIR)
    num_threads: int = 2  # CPU threads for the embedding model
    # Where audit records go: a Redis URL (a capped stream), else a JSONL file, else none.
    audit_redis_url: str = ""
    audit_file: str = ""
    # The Redis stream is trimmed to about this many records (the oldest go first).
    audit_max_records: int = 1_000_000
    # Longest prompt or stream accepted (INVALID_ARGUMENT beyond): the deployment's default
    # limits.max_prompt_chars. A check is linear in it (~1-2 us a character for the rules;
    # the embedding reads at most a few windows), so ~0.5 s at most.
    max_text_chars: int = 256 * 1024
    # Longest text a stream holds back while a match might still complete (characters).
    max_hold_chars: int = 256
