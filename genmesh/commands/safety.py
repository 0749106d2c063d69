"""``genmesh safety``: the safety service's tools.

``eval`` measures the prompt-injection detector on a labeled set (default: the held-out
set written once by hand and never tuned on) and, by default, how the learned layer
generalizes to attack families it never saw (leave-one-family-out). ``train`` builds the
injection classifier into the user's cache ahead of the service's first start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from services.safety import policy as policies
from services.safety.config import DEFAULT_CLASSIFIER_DIR, DEFAULT_POLICY
from services.safety.evaluate import (
    EVAL_FILE,
    HELDOUT2_FILE,
    HELDOUT_FILE,
    evaluate,
    load_examples,
)
from services.safety.policy import Scanner


def register(sub: argparse._SubParsersAction) -> None:
    safety = sub.add_parser("safety", help="the safety service's tools")
    actions = safety.add_subparsers(dest="safety_command", required=True)
    ev = actions.add_parser("eval", help="measure prompt-injection detection on a labeled set "
                                         "(and leave-one-family-out) and print JSON")
    ev.add_argument("--data", type=Path, default=HELDOUT_FILE,
                    help='JSONL lines {"text", "label": "attack"|"benign", "family"} '
                         f"(default: %(default)s; the blind second set: {HELDOUT2_FILE}; the "
                         f"older set: {EVAL_FILE})")
    ev.add_argument("--policy", type=Path, default=DEFAULT_POLICY,
                    help="policy file whose default policy is used (default: %(default)s)")
    ev.add_argument("--rules-only", action="store_true",
                    help="without the learned signals (embedding and classifier)")
    ev.add_argument("--no-classifier", action="store_true",
                    help="rules and exemplar similarity, without the classifier")
    ev.add_argument("--no-lofo", action="store_true",
                    help="skip the leave-one-family-out evaluation (one fine-tuning per "
                         "family: ~6 min each on two cores)")
    ev.add_argument("--threshold", type=float,
                    help="exemplar similarity threshold, used only with --no-classifier "
                         "(default: the policy's)")
    ev.add_argument("--misses", action="store_true",
                    help="also list the misclassified texts (their first 160 characters)")
    _cache_dir_arg(ev)
    ev.set_defaults(func=_eval)
    tr = actions.add_parser("train", help="train the prompt-injection classifier into the "
                                          "cache (skipped when it is there and current)")
    tr.add_argument("--force", action="store_true", help="retrain even when current")
    _cache_dir_arg(tr)
    tr.set_defaults(func=_train)


def _cache_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CLASSIFIER_DIR,
                        help="where the classifier's weights are cached (default: "
                             "%(default)s)")


def _eval(args: argparse.Namespace) -> int:
    try:
        examples = load_examples(args.data)
        policy = policies.load(args.policy).default
    except (OSError, ValueError) as exc:
        print(f"genmesh: {exc}", file=sys.stderr)
        return 2
    # Imported here: the model and torch take seconds to import, the errors above none.
    from services.safety.checker import PromptChecker
    from services.safety.classifier import load_or_train
    from services.safety.embedding import Embedder

    scanners = frozenset({Scanner.INJECTION} if args.rules_only
                         else {Scanner.INJECTION, Scanner.EMBEDDING})
    policy = dataclasses.replace(
        policy, prompt_scanners=scanners,
        embedding_threshold=args.threshold or policy.embedding_threshold)
    embedder = None if args.rules_only else Embedder.load()
    classifier = (load_or_train(embedder, args.cache_dir)
                  if embedder is not None and not args.no_classifier else None)
    report: dict[str, Any] = evaluate(examples, PromptChecker(embedder, classifier), policy,
                                      with_misses=args.misses)
    report = {"data": str(args.data), "embedding": embedder is not None,
              # The exemplar signal runs only without a classifier.
              "embedding_threshold": policy.embedding_threshold if classifier is None
              else None,
              "classifier_threshold": round(classifier.threshold, 4) if classifier else None,
              **report}
    if embedder is not None and not args.no_lofo:
        from services.safety.generalization import leave_one_family_out
        from services.safety.traindata import load_labelled

        report["leave_one_family_out"] = leave_one_family_out(
            embedder, heldout=load_labelled(args.data))
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def _train(args: argparse.Namespace) -> int:
    from services.safety.classifier import artifact_key, artifact_path, load_or_train
    from services.safety.embedding import Embedder
    from services.safety.prefilter import load_or_build

    embedder = Embedder.load()
    key = artifact_key(embedder)
    path = artifact_path(args.cache_dir, key)
    was_current = path.exists() and not args.force
    classifier = load_or_train(embedder, args.cache_dir, retrain=args.force)
    # The rules' prefilter database, cached beside it (a service would build it at start).
    prefilter = load_or_build(args.cache_dir, wait=True)
    print(json.dumps({"path": str(path), "key": key, "was_current": was_current,
                      "threshold": round(classifier.threshold, 4),
                      "rule_prefilter": prefilter.ready.is_set()}, indent=2))
    return 0
