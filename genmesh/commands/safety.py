"""``genmesh safety eval``: the prompt-injection detector's precision, recall and
false-positive rate on a labeled set (default: the repository's evaluation set)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from services.safety import policy as policies
from services.safety.checker import PromptChecker
from services.safety.config import DEFAULT_POLICY
from services.safety.embedding import Embedder
from services.safety.evaluate import EVAL_FILE, evaluate, load_examples
from services.safety.policy import Scanner


def register(sub: argparse._SubParsersAction) -> None:
    safety = sub.add_parser("safety", help="the safety service's tools")
    actions = safety.add_subparsers(dest="safety_command", required=True)
    ev = actions.add_parser("eval", help="measure prompt-injection detection on a labeled set "
                                         "and print JSON")
    ev.add_argument("--data", type=Path, default=EVAL_FILE,
                    help='JSONL lines {"text", "label": "attack"|"benign", "family"} '
                         "(default: %(default)s)")
    ev.add_argument("--policy", type=Path, default=DEFAULT_POLICY,
                    help="policy file whose default policy is used (default: %(default)s)")
    ev.add_argument("--rules-only", action="store_true", help="without the embedding signal")
    ev.add_argument("--threshold", type=float,
                    help="embedding threshold (default: the policy's)")
    ev.add_argument("--misses", action="store_true",
                    help="also list the misclassified texts (their first 160 characters)")
    ev.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    try:
        examples = load_examples(args.data)
        policy = policies.load(args.policy).default
    except (OSError, ValueError) as exc:
        print(f"genmesh: {exc}", file=sys.stderr)
        return 2
    scanners = frozenset({Scanner.INJECTION} if args.rules_only
                         else {Scanner.INJECTION, Scanner.EMBEDDING})
    policy = dataclasses.replace(
        policy, prompt_scanners=scanners,
        embedding_threshold=args.threshold or policy.embedding_threshold)
    embedder = None if args.rules_only else Embedder.load()
    report = evaluate(examples, PromptChecker(embedder), policy, with_misses=args.misses)
    report = {"data": str(args.data), "embedding": embedder is not None,
              "embedding_threshold": policy.embedding_threshold, **report}
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0
