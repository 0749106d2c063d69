"""What every scanner returns, and the pattern detector that works both on whole texts
(a prompt) and on streams (generated text arriving in chunks).

Patterns are compiled with the ``regex`` module rather than ``re`` because it can match
*partially*: ``pattern.search(text, partial=True)`` reports a match that runs into the
end of the text and could still complete if more text arrived. The stream moderator
holds back exactly those characters, and releases everything before them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import regex


@dataclass(frozen=True, slots=True)
class Span:
    """One finding, located in the scanned text."""

    start: int  # character offset in the scanned text (inclusive)
    end: int  # character offset in the scanned text (exclusive)
    category: str  # e.g. "pii.email", "pii.card", "secret", "violence", "prompt_injection"
    scanner: str  # which scanner found it: "pii", "secrets", "lexicon", "rules", "embedding"
    score: float = 1.0  # 0..1 confidence; 1 for an exact, validated pattern
    label: str = ""  # the text that replaces the span when it is redacted, e.g. "[EMAIL]"


@dataclass(frozen=True, slots=True)
class Detector:
    """A pattern for one category. ``validate`` confirms a candidate match (a Luhn or
    IBAN checksum, say); ``None`` accepts every match."""

    category: str
    scanner: str
    pattern: regex.Pattern[str]
    label: str
    validate: Callable[[str], bool] | None = None
    # Lower-case substrings of which every complete match (with what its lookbehind reads),
    # case-folded, holds one: a text without any of them is not scanned. Empty: always.
    anchors: tuple[str, ...] = ()
    # A case-sensitive pattern that the text, case-folded, matches wherever the detector
    # can match: what its lookbehind must read, searched forward ("password ="), ~6x
    # faster than the lookbehind tried at every character. None: always scanned.
    context: re.Pattern[str] | None = None

    def find(self, text: str, pos: int = 0, endpos: int | None = None) -> list[Span]:
        """Every complete, validated, non-overlapping match in ``text[pos:endpos]``."""
        if self.anchors or self.context is not None:
            # Case-folded, as the patterns' case-insensitive names match ("K" the Kelvin
            # sign and "ſ" fold to k and s; lower() leaves "ſ").
            folded = text.casefold()
            if self.anchors and not any(a in folded for a in self.anchors):
                return []
            if self.context is not None and self.context.search(folded) is None:
                return []
        end = len(text) if endpos is None else endpos
        spans = []
        for m in self.pattern.finditer(text, pos, end, overlapped=False):
            if m.end() == m.start():
                continue
            if self.validate is None or self.validate(m.group()):
                spans.append(Span(m.start(), m.end(), self.category, self.scanner, 1.0,
                                  self.label))
        return spans

    def pending_start(self, text: str, pos: int = 0) -> int | None:
        """Where the earliest match that runs into the end of ``text`` (and could still
        grow or complete) begins; None when no match could continue past the end."""
        for m in self.pattern.finditer(text, pos, partial=True, overlapped=True):
            if m.end() == len(text) and m.end() > m.start():
                return m.start()
        return None
