"""The learned prompt-injection layer: logistic regression over sentence embeddings.

A prompt is embedded as the texts the checker already embeds for the exemplar signal
(``prompt_texts``: windows of its folded view, plus the spaced-out and decoded views),
so the classifier costs one dot product per text on embeddings that are computed anyway.
A prompt's score is the highest of its texts' probabilities: one injected sentence in a
long e-mail is enough, and training optimises the same max (multiple-instance learning).

Training data is generated (``traindata.generate``), the fit is full-batch and seeded,
and the decision threshold is calibrated on a second generated set (another seed): the
lowest that keeps its false-positive rate on benign texts at ``MAX_CALIBRATION_FPR``.
The weights live in the user's cache (never in git), named by a hash of everything that
determines them (``artifact_key``): a missing or stale file is retrained in seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from services.safety import traindata
from services.safety.embedding import Embedder
from services.safety.injection import fragment_views, hidden_texts, join_spaced
from services.safety.normalize import fold

log = logging.getLogger("genmesh.safety")

FORMAT_VERSION = "1"
# The sources whose change changes the trained weights: the data, the features, the fit.
_SOURCES = ("traindata.py", "classifier.py", "embedding.py", "minilm.py", "normalize.py",
            "injection.py",
            "data/dev.jsonl", "data/dev2.jsonl")
TRAIN_SEED = 0
CALIBRATION_SEED = 1
NUM_PER_FAMILY = 60  # ~1,300 generated prompts; with calibration, ~20 s of CPU to embed
MAX_CALIBRATION_FPR = 0.01
MIN_THRESHOLD = 0.5
MAX_CACHED = 4  # classifiers (code versions) kept in the cache


def prompt_texts(embedder: Embedder, text: str, folded: str | None = None) -> list[str]:
    """What is embedded for ``text``: windows of its folded view (case, look-alikes,
    invisible characters and leetspeak undone: the model reads words, not tricks), then
    the spaced-out letters joined, the split pieces joined and the decoded texts.
    ``folded``: ``fold(text).text`` when the caller has it."""
    folded = fold(text).text if folded is None else folded
    extras = [fold(v).text for v in (join_spaced(text), *fragment_views(text)[:1],
                                     *hidden_texts(text)) if v]
    return embedder.texts_for(folded, extras)


@dataclass(frozen=True, slots=True)
class TrainResult:
    classifier: InjectionClassifier
    num_examples: int
    calibration_fpr: float  # at the chosen threshold, on the calibration set's benign texts
    calibration_recall: float  # the same, on its attacks
    seconds: float


class InjectionClassifier:
    """Owns the weights; scores one prompt's text embeddings."""

    def __init__(self, weight: torch.Tensor, bias: float, threshold: float) -> None:
        self.weight = weight.float()  # [384]
        self.bias = bias
        self.threshold = threshold  # a prompt scoring at or above it is an attack

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Probabilities [N] for text embeddings [N, 384]."""
        return torch.sigmoid(embeddings.float() @ self.weight + self.bias)

    def score(self, embeddings: torch.Tensor) -> float:
        """A prompt's score: its most suspicious text's probability (0 with no texts)."""
        return float(self.scores(embeddings).max()) if len(embeddings) else 0.0

    def save(self, path: Path, *, key: str) -> None:
        """Written to a temporary file, then renamed: a reader never sees half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"weight": self.weight.contiguous(), "bias": torch.tensor([self.bias])},
                      tmp, metadata={"key": key, "threshold": repr(self.threshold)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: Path, *, key: str) -> InjectionClassifier | None:
        """The classifier saved at ``path``; None when missing, unreadable or stale."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            tensors = load_file(str(path))
            return cls(tensors["weight"], float(tensors["bias"][0]), float(meta["threshold"]))
        except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as exc:
            log.warning("cannot read the injection classifier; retraining",
                        extra={"path": str(path), "error": repr(exc)})
            return None


def artifact_key(embedder: Embedder) -> str:
    """A hash of what determines the weights: the sources, the settings, the model dtype."""
    h = hashlib.sha256()
    h.update(f"{FORMAT_VERSION}|{TRAIN_SEED}|{CALIBRATION_SEED}|{NUM_PER_FAMILY}|"
             f"{MAX_CALIBRATION_FPR}|{embedder.model.dtype}|{embedder.max_words}|"
             f"{embedder.max_windows}|{embedder.max_extra}".encode())
    here = Path(__file__).parent
    for name in _SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def artifact_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"injection-classifier-{key[:16]}.safetensors"


@dataclass(frozen=True, slots=True)
class Features:
    """Text embeddings of a set of prompts, grouped by prompt."""

    embeddings: torch.Tensor  # [W, 384]: every prompt's texts, in prompt order
    prompt_ids: torch.Tensor  # [W]: the prompt each text belongs to
    labels: torch.Tensor  # [P]: 1.0 for an attack


def featurize(embedder: Embedder, texts: Sequence[str], labels: Sequence[bool], *,
              batch_size: int = 256) -> Features:
    per_prompt = [prompt_texts(embedder, t) or [""] for t in texts]
    flat = [t for ts in per_prompt for t in ts]
    # Sorted by length, so a batch pads to about its own length, not the longest text's.
    order = sorted(range(len(flat)), key=lambda i: len(flat[i]))
    out = torch.empty(len(flat), embedder.exemplars.shape[1])
    for start in range(0, len(order), batch_size):
        ids = order[start:start + batch_size]
        out[ids] = embedder._encode([flat[i] for i in ids])
    prompt_ids = torch.tensor([p for p, ts in enumerate(per_prompt) for _ in ts])
    return Features(out, prompt_ids, torch.tensor([float(x) for x in labels]))


def prompt_scores(features: Features, weight: torch.Tensor, bias: torch.Tensor
                  ) -> torch.Tensor:
    """Each prompt's highest text logit [P]."""
    logits = features.embeddings @ weight + bias  # [W]
    out = torch.full((len(features.labels),), -torch.inf)
    return out.scatter_reduce(0, features.prompt_ids, logits, reduce="amax")


def fit(features: Features, *, l2: float = 1e-3, num_steps: int = 60, seed: int = TRAIN_SEED
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [384] and bias [1] minimising the class-balanced logistic loss of each
    prompt's highest text logit, plus ``l2``; full-batch L-BFGS from a seeded start."""
    gen = torch.Generator().manual_seed(seed)
    dim = features.embeddings.shape[1]
    weight = (torch.randn(dim, generator=gen) * 0.01).requires_grad_()
    bias = torch.zeros(1, requires_grad=True)
    labels = features.labels
    num_pos = float(labels.sum())
    pos_weight = torch.tensor((len(labels) - num_pos) / max(num_pos, 1.0))
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=num_steps,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            prompt_scores(features, weight, bias), labels, pos_weight=pos_weight)
        loss = loss + l2 * (weight * weight).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return weight.detach(), bias.detach()


def calibrate(scores: torch.Tensor, labels: torch.Tensor, *,
              max_fpr: float = MAX_CALIBRATION_FPR) -> float:
    """The lowest threshold (at least ``MIN_THRESHOLD``) at which at most ``max_fpr`` of
    the benign ``scores`` [P] (probabilities) reach it."""
    benign = torch.sort(scores[labels < 0.5], descending=True).values
    num_allowed = int(max_fpr * len(benign))
    if num_allowed >= len(benign):
        return MIN_THRESHOLD
    # Just above the first benign score that must not pass.
    return max(MIN_THRESHOLD, float(benign[num_allowed]) + 1e-6)


def default_sets() -> tuple[list[traindata.Example], list[traindata.Example]]:
    """The training set (generated at TRAIN_SEED, plus the hand-written ``dev.jsonl``) and
    the calibration set (generated at CALIBRATION_SEED, plus ``dev2.jsonl``). The
    evaluation sets (``eval.jsonl``, ``heldout.jsonl``) are in neither."""
    examples = traindata.generate(seed=TRAIN_SEED, num_per_family=NUM_PER_FAMILY)
    calibration = traindata.generate(seed=CALIBRATION_SEED, num_per_family=NUM_PER_FAMILY // 2)
    return (examples + traindata.load_labelled(traindata.DEV_FILE),
            calibration + traindata.load_labelled(traindata.DEV2_FILE))


def train(embedder: Embedder, *, examples: Sequence[traindata.Example] | None = None,
          calibration: Sequence[traindata.Example] | None = None) -> TrainResult:
    """Fits on ``examples`` and calibrates on ``calibration`` (default: ``default_sets``)."""
    t0 = time.perf_counter()
    if examples is None or calibration is None:
        examples, calibration = default_sets()
    train_x = featurize(embedder, [e.text for e in examples], [e.is_attack for e in examples])
    cal_x = featurize(embedder, [e.text for e in calibration],
                      [e.is_attack for e in calibration])
    classifier, fpr, recall = fit_and_calibrate(train_x, cal_x)
    return TrainResult(classifier, len(examples), fpr, recall,
                       round(time.perf_counter() - t0, 2))


def fit_and_calibrate(train_x: Features, cal_x: Features
                      ) -> tuple[InjectionClassifier, float, float]:
    """The classifier fitted on ``train_x`` with its threshold calibrated on ``cal_x``, and
    the calibration set's false-positive rate and recall at that threshold."""
    weight, bias = fit(train_x)
    cal_scores = torch.sigmoid(prompt_scores(cal_x, weight, bias))
    threshold = calibrate(cal_scores, cal_x.labels)
    flagged = cal_scores >= threshold
    is_attack = cal_x.labels > 0.5
    fpr = float(flagged[~is_attack].float().mean()) if (~is_attack).any() else 0.0
    recall = float(flagged[is_attack].float().mean()) if is_attack.any() else 0.0
    return InjectionClassifier(weight, float(bias[0]), threshold), round(fpr, 4), round(recall, 4)


def load_or_train(embedder: Embedder, cache_dir: Path, *,
                  retrain: bool = False) -> InjectionClassifier:
    """The cached classifier for this code and model, trained and cached first when it is
    missing or stale (or ``retrain``). A cache that cannot be written is logged, and the
    classifier is used from memory."""
    key = artifact_key(embedder)
    path = artifact_path(cache_dir, key)
    if not retrain and path.exists():
        loaded = InjectionClassifier.load(path, key=key)
        if loaded is not None:
            return loaded
    result = train(embedder)
    log.info("injection classifier trained", extra={
        "examples": result.num_examples, "seconds": result.seconds,
        "threshold": round(result.classifier.threshold, 4),
        "calibration_fpr": result.calibration_fpr,
        "calibration_recall": result.calibration_recall})
    try:
        result.classifier.save(path, key=key)
        _drop_old(cache_dir)
    except OSError as exc:
        log.warning("cannot cache the injection classifier; using it from memory",
                    extra={"path": str(path), "error": repr(exc)})
    return result.classifier


def _drop_old(cache_dir: Path, *, num_kept: int = MAX_CACHED) -> None:
    """Removes all but the ``num_kept`` newest classifiers: each code version leaves one,
    and checkouts of different versions may share the cache."""
    paths = sorted(cache_dir.glob("injection-classifier-*.safetensors"),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for old in paths[num_kept:]:
        old.unlink(missing_ok=True)
