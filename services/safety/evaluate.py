"""Measures the prompt-injection detector on a labeled set: precision, recall and
false-positive rate, overall and per family.

A line of the set is ``{"text": ..., "label": "attack"|"benign", "family": ...}``. A text
counts as flagged when the checker reports a ``prompt_injection`` finding under the
policy given (by default the repository's default policy, injection scanners only).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.safety.checker import PromptChecker
from services.safety.policy import PROMPT_INJECTION, TenantPolicy

EVAL_FILE = Path(__file__).parent / "data" / "eval.jsonl"
# Written once by hand for the learned layer (new phrasings, every family, close benign
# prompts), committed before anything was measured on it, and never tuned on.
HELDOUT_FILE = Path(__file__).parent / "data" / "heldout.jsonl"
# Written blind by a separate author (no safety code, data or rules seen) and committed
# before its first run; never tuned on.
HELDOUT2_FILE = Path(__file__).parent / "data" / "heldout2.jsonl"
# A third, written the same way by another author (committed before its first run).
HELDOUT3_FILE = Path(__file__).parent / "data" / "heldout3.jsonl"
# What nothing is trained or calibrated on.
EVALUATION_FILES = (EVAL_FILE, HELDOUT_FILE, HELDOUT2_FILE, HELDOUT3_FILE)
LABELS = ("attack", "benign")


@dataclass(frozen=True, slots=True)
class Example:
    text: str
    label: str  # "attack" or "benign"
    family: str


def load_examples(path: Path) -> list[Example]:
    """The set at ``path``; ValueError naming the line for a malformed one."""
    examples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            example = Example(str(row["text"]), str(row["label"]), str(row.get("family", "")))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: expected a JSON object with text and label ({exc})"
                             ) from None
        if example.label not in LABELS:
            raise ValueError(f"{path}:{n}: label must be attack or benign, got {example.label!r}")
        examples.append(example)
    return examples


@dataclass(slots=True)
class Counts:
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def add(self, *, is_attack: bool, is_flagged: bool) -> None:
        if is_attack:
            self.tp += is_flagged
            self.fn += not is_flagged
        else:
            self.fp += is_flagged
            self.tn += not is_flagged

    def summary(self) -> dict[str, Any]:
        def ratio(a: int, b: int) -> float | None:
            return round(a / b, 4) if b else None

        return {"n": self.tp + self.fp + self.tn + self.fn,
                "precision": ratio(self.tp, self.tp + self.fp),
                "recall": ratio(self.tp, self.tp + self.fn),
                "false_positive_rate": ratio(self.fp, self.fp + self.tn),
                "tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn}


def evaluate(examples: Iterable[Example], checker: PromptChecker, policy: TenantPolicy,
             *, with_misses: bool = False) -> dict[str, Any]:
    overall = Counts()
    families: dict[str, Counts] = defaultdict(Counts)
    by_scanner: dict[str, int] = defaultdict(int)
    misses: list[dict[str, str]] = []
    latencies = []
    for ex in examples:
        t0 = time.perf_counter()
        decision = checker.check(ex.text, policy)
        latencies.append((time.perf_counter() - t0) * 1e3)
        flags = [f for f in decision.findings if f.category == PROMPT_INJECTION]
        is_attack, is_flagged = ex.label == "attack", bool(flags)
        overall.add(is_attack=is_attack, is_flagged=is_flagged)
        families[ex.family].add(is_attack=is_attack, is_flagged=is_flagged)
        for f in flags:
            by_scanner[f.scanner] += 1
        if with_misses and is_attack != is_flagged:
            misses.append({"label": ex.label, "family": ex.family, "text": ex.text[:160],
                           "flagged_by": ",".join(f"{f.scanner}:{f.family}" for f in flags)})
    latencies.sort()
    report: dict[str, Any] = {
        "overall": overall.summary(),
        "per_family": {name: c.summary() for name, c in sorted(families.items())},
        "flags_by_scanner": dict(sorted(by_scanner.items())),
        "check_ms": {"p50": round(latencies[len(latencies) // 2], 2) if latencies else None,
                     "p99": round(latencies[int(len(latencies) * 0.99)], 2)
                     if latencies else None},
    }
    if with_misses:
        report["misses"] = misses
    return report
