"""The classifier's score of each text a prompt check embeds, kept for texts seen again.

The same texts come back all the time: an operator's system prompt is sent, and checked,
with every request of a conversation and of every conversation; a template's sentences
recur in prompt after prompt. Each costs the encoder's layers again (a system prompt of
~1,500 characters is ~7 texts, tens of milliseconds of CPU). ``ScoreCache`` keeps the
probability of the most recent ``max_texts`` texts, least recently used out first, and
computes only the texts it does not hold, each distinct one once per call.

Entries are per scope (the tenant): a cached text is checked faster, and across tenants
that would tell one tenant what another has sent. A score is the one computed when the
text was first seen; computed again in another batch it could differ in its last bits
(the encoder's matmuls round by batch shape), never in what it means. The cache lives as
long as the process, so a retrained classifier (a new artifact) starts with an empty one.
Only the batcher's thread calls it (``batcher.py``): no lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from services.safety import metrics
from services.safety.embedding import Scored

MAX_TEXTS = 4096  # ~2 MB of texts of a few hundred characters
MAX_TEXT_CHARS = 2048  # a longer text (a 40-word window of long "words") is not kept


@dataclass(frozen=True, slots=True)
class TextScore:
    probability: float  # the classifier's, for this text alone (a float32's value)
    uncut: bool  # the text was read whole (it did not reach the token limit)


class ScoreCache:
    """Owns the (scope, text) → score entries."""

    def __init__(self, max_texts: int = MAX_TEXTS, *,
                 max_text_chars: int = MAX_TEXT_CHARS) -> None:
        if max_texts < 0:
            raise ValueError(f"max_texts must be >= 0, got {max_texts}")
        self.max_texts = max_texts
        self.max_text_chars = max_text_chars
        self._entries: OrderedDict[tuple[str, str], TextScore] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def scored(self, texts_per_prompt: Sequence[Sequence[str]], scopes: Sequence[str],
               compute: Callable[[list[str]], list[TextScore]]) -> list[Scored]:
        """Each prompt's scores, as ``Embedder.encode_scored`` gives them, with
        ``compute`` called once for the distinct texts not held (in their first order)
        under the prompt's scope (``scopes[i]`` for ``texts_per_prompt[i]``)."""
        held: dict[tuple[str, str], TextScore] = {}
        missing: dict[str, None] = {}
        for scope, texts in zip(scopes, texts_per_prompt, strict=True):
            for text in texts:
                key = (scope, text)
                if key in held:
                    continue
                found = self._entries.get(key)
                if found is None:
                    missing[text] = None
                else:
                    self._entries.move_to_end(key)
                    held[key] = found
        num_hits = len(held)
        computed = dict(zip(missing, compute(list(missing)), strict=True)) if missing else {}
        out = []
        for scope, texts in zip(scopes, texts_per_prompt, strict=True):
            scores = []
            for text in texts:
                key = (scope, text)
                score = held.get(key)
                if score is None:
                    score = held[key] = computed[text]
                    self._keep(key, score)
                scores.append(score)
            out.append(Scored(torch.tensor([s.probability for s in scores], dtype=torch.float32),
                              bool(scores) and all(s.uncut for s in scores)))
        metrics.SCORE_CACHE_TEXTS.labels("hit").inc(num_hits)
        metrics.SCORE_CACHE_TEXTS.labels("miss").inc(len(held) - num_hits)
        return out

    def _keep(self, key: tuple[str, str], score: TextScore) -> None:
        if self.max_texts == 0 or len(key[1]) > self.max_text_chars:
            return
        self._entries[key] = score
        if len(self._entries) > self.max_texts:
            self._entries.popitem(last=False)


def text_scores(scored: Sequence[Scored]) -> list[TextScore]:
    """``Embedder.encode_scored``'s answer for one-text prompts, as one score each."""
    return [TextScore(float(s.probabilities[0]), s.uncut) for s in scored]
