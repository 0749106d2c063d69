"""How well the learned layer generalizes: leave-one-family-out.

For each attack family F (an intent such as exfiltration, or an obfuscation such as
leetspeak), the classifier is trained and calibrated again without any example of F
(attacks of F, and benign texts obfuscated the way F obfuscates), then tested on F's
attacks from a generated test set (its own seed) and, where given, from a hand-written
set, and on every benign text of those sets. Texts go through the encoder's shared lower
layers once; the fine-tuning runs per family (a few minutes each on two cores).

Each figure comes twice: the classifier alone, and the whole detector (rules and
classifier, decided as the checker decides: a rule's hit the classifier scores under its
veto is cleared, when it read the whole prompt; with a classifier the checker runs no
exemplar signal). The rules were written by hand with every family in view, so only the
classifier's figure measures generalization to an unseen family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from services.safety import traindata
from services.safety.classifier import (
    Features,
    default_sets,
    featurize,
    fit_and_calibrate,
    prompt_probabilities,
    training_threads,
    whole_prompt_texts,
)
from services.safety.embedding import Embedder

TEST_SEED = 2
NUM_TEST_PER_FAMILY = 30


@dataclass(frozen=True, slots=True)
class Scored:
    """A test set with what the fixed (hand-written) signals say about each prompt."""

    examples: Sequence[traindata.Example]
    features: Features
    # [P] bool: the classifier reads every part of the prompt, each text whole, so it may
    # clear a rule's hit (``checker.decide``)
    is_read_whole: torch.Tensor

    def by_hand(self, scores: torch.Tensor, veto: float) -> torch.Tensor:
        """[P] bool: the rule hits that stand, as ``checker.decide`` decides them given
        the classifier's ``scores`` [P] and its ``veto``."""
        return self.features.rule_hits & ~((scores < veto) & self.is_read_whole
                                           & ~self.features.veto_proof)


def subset(features: Features, keep: torch.Tensor) -> Features:
    """The prompts where ``keep`` [P] is True, renumbered."""
    new_ids = torch.cumsum(keep.long(), 0) - 1  # [P]: a kept prompt's new index
    text_kept = keep[features.prompt_ids]  # [W]
    return Features([s for s, k in zip(features.states, text_kept.tolist(), strict=True) if k],
                    new_ids[features.prompt_ids[text_kept]], features.labels[keep],
                    features.rule_hits[keep], features.veto_proof[keep])


def _holds(example: traindata.Example, family: str) -> bool:
    return example.family == family or example.obfuscation == family


def score_set(embedder: Embedder, examples: Sequence[traindata.Example]) -> Scored:
    features = featurize(embedder, [e.text for e in examples], [e.is_attack for e in examples])
    cut_at = embedder.model.max_seq_length
    uncut = torch.ones(len(examples), dtype=torch.bool)
    for state, prompt in zip(features.states, features.prompt_ids.tolist(), strict=True):
        if len(state) >= cut_at:
            uncut[prompt] = False
    whole = torch.tensor([whole_prompt_texts(embedder, e.text) is not None for e in examples],
                         dtype=torch.bool)
    return Scored(examples, features, whole & uncut)


def _rates(flagged: torch.Tensor, examples: Sequence[traindata.Example], family: str
           ) -> dict[str, Any]:
    attacks = [i for i, e in enumerate(examples) if e.is_attack and e.family == family]
    benign = [i for i, e in enumerate(examples) if not e.is_attack]
    return {
        "n_attacks": len(attacks),
        "recall": round(float(flagged[attacks].float().mean()), 4) if attacks else None,
        "false_positive_rate": round(float(flagged[benign].float().mean()), 4)
        if benign else None}


def leave_one_family_out(embedder: Embedder, *, heldout: Sequence[traindata.Example] = (),
                         families: Sequence[str] = traindata.ATTACK_FAMILIES
                         ) -> dict[str, Any]:
    """Per family: recall on its attacks and false-positive rate on all benign texts, of
    the classifier trained without it (alone and with the hand-written signals), on the
    generated test set and on ``heldout``; trained as ``train`` trains
    (``training_threads``)."""
    with training_threads():
        return _leave_one_family_out(embedder, heldout, families)


def _leave_one_family_out(embedder: Embedder, heldout: Sequence[traindata.Example],
                          families: Sequence[str]) -> dict[str, Any]:
    examples, calibration = default_sets()
    train_x = featurize(embedder, [e.text for e in examples], [e.is_attack for e in examples])
    cal_x = featurize(embedder, [e.text for e in calibration],
                      [e.is_attack for e in calibration])
    tests = {"generated": score_set(
        embedder, traindata.generate(seed=TEST_SEED, num_per_family=NUM_TEST_PER_FAMILY))}
    if heldout:
        tests["heldout"] = score_set(embedder, heldout)
    report: dict[str, Any] = {}
    for family in families:
        keep_train = torch.tensor([not _holds(e, family) for e in examples])
        keep_cal = torch.tensor([not _holds(e, family) for e in calibration])
        classifier, _, _ = fit_and_calibrate(embedder, subset(train_x, keep_train),
                                             subset(cal_x, keep_cal))
        row: dict[str, Any] = {"threshold": round(classifier.threshold, 4),
                               "veto": round(classifier.veto, 4)}
        for name, test in tests.items():
            if not any(e.is_attack and e.family == family for e in test.examples):
                continue
            scores = prompt_probabilities(classifier, test.features)
            learned = scores >= classifier.threshold
            # As the checker decides: a rule's hit stands unless the classifier clears it
            # (scores it under its veto, having read the whole prompt).
            by_hand = test.by_hand(scores, classifier.veto)
            row[name] = {"classifier": _rates(learned, test.examples, family),
                         "detector": _rates(learned | by_hand, test.examples,
                                            family)}
        report[family] = row
    return report
