"""Content categories: lexicons of phrases and patterns (violence, self-harm, hate,
sexual content involving minors, weapons, or any category a policy adds).

Matching runs on the folded text (``normalize.fold``: case, confusables, invisible
characters, leetspeak), so "K1LL Y0URSELF" and "kіll yourself" with a Cyrillic і match
"kill yourself"; spans map back to the original text. Between the words of a phrase any
short run of spaces or punctuation matches ("kill... yourself").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import regex

from services.safety.normalize import Folded, fold
from services.safety.regex_heads import WordStarts, first_words, matches_at, shortest_prefixes
from services.safety.scanners import Detector, Span

SCANNER = "content"
# Between two words of a phrase: 1-3 characters that are not letters or digits.
_GAP = r"[^\p{L}\p{N}]{1,3}"


class LexiconError(ValueError):
    """A lexicon that cannot be compiled; the message names the category."""


@dataclass(frozen=True, slots=True)
class LexiconEntry:
    phrases: tuple[str, ...] = ()  # literal phrases, matched word by word
    patterns: tuple[str, ...] = ()  # regular expressions over the folded (lowercase) text


# A text this long is indexed by its words (runs of letters and digits, as the patterns'
# lookbehind judges them), and a category whose matches all start with one of a few
# literal word starts (``regex_heads.first_words``) is matched only there: searching
# 2,000 characters for a category's alternation costs ~75 us, the index that once.
_INDEXED_TEXT = 400
_WORD = regex.compile(r"[\p{L}\p{N}]+", regex.V1)


@dataclass(frozen=True, slots=True)
class Lexicon:
    entries: Mapping[str, LexiconEntry] = field(default_factory=dict)  # category → entry
    detectors: tuple[Detector, ...] = ()  # one per category, over the folded text
    # Per detector: the literal word starts every match begins with; None: not known.
    heads: tuple[tuple[str, ...] | None, ...] = ()

    def scan(self, text: str, folded: Folded | None = None) -> list[Span]:
        """Every category match in ``text``, located in ``text`` itself."""
        folded = folded or fold(text)
        starts = None
        spans = []
        for d, heads in zip(self.detectors, self.heads or [None] * len(self.detectors),
                            strict=True):
            if heads is None or len(folded.text) < _INDEXED_TEXT:
                found = d.find(folded.text)
            else:
                starts = starts or WordStarts(folded.text, _WORD)
                found = [Span(m.start(), m.end(), d.category, d.scanner, 1.0, d.label)
                         for m in matches_at(d.pattern, folded.text, starts.of(heads))]
            for s in found:
                start, end = folded.span(s.start, s.end)
                spans.append(Span(start, end, s.category, s.scanner, s.score, s.label))
        return sorted(spans, key=lambda s: s.start)


def parse_lexicon(raw: Any) -> dict[str, LexiconEntry]:
    """``{category: {phrases: [...], patterns: [...]}}`` (or a bare list of phrases)."""
    if not isinstance(raw, dict):
        raise LexiconError("expected a mapping of category to {phrases, patterns}")
    entries = {}
    for category, body in raw.items():
        if isinstance(body, list):
            body = {"phrases": body}
        if not isinstance(body, dict) or set(body) - {"phrases", "patterns"}:
            raise LexiconError(f"category {category}: expected phrases and/or patterns")
        entries[str(category)] = LexiconEntry(
            tuple(str(p) for p in body.get("phrases") or ()),
            tuple(str(p) for p in body.get("patterns") or ()))
    return entries


def phrase_pattern(phrase: str) -> str:
    words = fold(phrase, leet=False).text.split()
    return _GAP.join(regex.escape(w) for w in words)


def compile_lexicon(entries: Mapping[str, LexiconEntry]) -> Lexicon:
    detectors, heads = [], []
    for category, entry in entries.items():
        # Longest first, so the alternation prefers the longest phrase at a position.
        parts = sorted((phrase_pattern(p) for p in entry.phrases if p.strip()),
                       key=len, reverse=True)
        parts += [f"(?:{p})" for p in entry.patterns]
        if not parts:
            continue
        try:
            pattern = regex.compile(r"(?<![\p{L}\p{N}])(?:" + "|".join(parts)
                                    + r")(?![\p{L}\p{N}])", regex.V1)
        except regex.error as exc:
            raise LexiconError(f"category {category}: bad pattern ({exc})") from None
        detectors.append(Detector(category, SCANNER, pattern, f"[{category.upper()}]"))
        # A space or a gap ends a word of letters and digits; "\\b" does not (it holds
        # before a No-category character, such as a Tamil numeral).
        words = first_words("(?:" + "|".join(parts) + ")", (" ", _GAP))
        heads.append(None if words is None else shortest_prefixes(words))
    return Lexicon(dict(entries), tuple(detectors), tuple(heads))
