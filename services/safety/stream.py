"""Moderation of generated text while it streams.

Text arrives in chunks (detokenized deltas). The moderator releases text as soon as no
pattern could still match through it, and holds back only the tail that could: a match
in progress, per the ``regex`` module's partial matching ("4111 1111" might become a card
number; "how to ma" might become "how to make a bomb"). So a banned phrase or a card
number split across chunks is never released, and clean text waits at most until the
next character that rules a match out, or ``max_hold_chars``, whichever comes first.

A released region is scanned for complete matches: redacted spans are replaced by their
labels, and a blocking match ends the stream (the text before it is released).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from services.safety.checker import Finding, apply_spans, detectors_for, finding
from services.safety.normalize import fold
from services.safety.policy import Action, Scanner, TenantPolicy
from services.safety.scanners import Span


@dataclass(frozen=True, slots=True)
class Release:
    text: str  # text now safe to send on (redacted where the policy says so)
    findings: tuple[Finding, ...]  # findings in the released text
    blocked: Finding | None = None  # set when the stream must end here
    # Characters of the text fed (before redaction) that ``text`` stands for.
    num_raw_chars: int = 0


class StreamModerator:
    """One generation's output. Owns the held-back tail and a little released context
    (so word boundaries and look-behinds see what came before)."""

    def __init__(self, policy: TenantPolicy, *, max_hold_chars: int = 256,
                 context_chars: int = 32) -> None:
        self.policy = policy
        self.raw_detectors = detectors_for(policy.output_scanners)
        self.lexicon = (policy.lexicon if Scanner.CONTENT in policy.output_scanners
                        else None)
        self.max_hold_chars = max_hold_chars
        self.context_chars = context_chars
        self.context = ""  # released raw text, its last context_chars characters
        self.pending = ""  # raw text received but not released
        self.is_blocked = False

    def feed(self, text: str) -> Release:
        if self.is_blocked:
            return Release("", ())
        self.pending += text
        return self._release(final=False)

    def flush(self, text: str = "") -> Release:
        """The generation ended (``text`` is its last piece): release everything."""
        if self.is_blocked:
            return Release("", ())
        self.pending += text
        return self._release(final=True)

    def _spans(self, raw: str, base: int) -> tuple[list[Span], int]:
        """Complete matches starting at or after ``base``, and where the earliest match
        that runs into the end of ``raw`` begins (len(raw) when none)."""
        hold = len(raw)
        spans: list[Span] = []
        for d in self.raw_detectors:
            start = d.pending_start(raw, base)
            if start is not None:
                hold = min(hold, start)
            spans += d.find(raw, base)
        if self.lexicon is not None and self.lexicon.detectors:
            folded = fold(raw)
            fbase = bisect.bisect_left(folded.offsets, base, 0, len(folded.text))
            for d in self.lexicon.detectors:
                start = d.pending_start(folded.text, fbase)
                if start is not None:
                    hold = min(hold, folded.offsets[start])
                for s in d.find(folded.text, fbase):
                    a, b = folded.span(s.start, s.end)
                    spans.append(Span(a, b, s.category, s.scanner, s.score, s.label))
        return spans, hold

    def _release(self, *, final: bool) -> Release:
        raw = self.context + self.pending
        base = len(self.context)
        spans, hold = self._spans(raw, base)
        if final:
            hold = len(raw)
        elif hold < len(raw) - self.max_hold_chars:
            hold = len(raw) - self.max_hold_chars  # bound the delay of an endless partial
        # A complete match reaching past the hold point waits with it.
        while True:
            straddling = [s.start for s in spans if s.start < hold < s.end]
            if not straddling:
                break
            hold = min(straddling)
        spans = sorted((s for s in spans if s.end <= hold), key=lambda s: s.start)
        block = next((s for s in spans if self.policy.action(s.category) == Action.BLOCK),
                     None)
        if block is not None:  # release the text before it, then nothing more
            hold = block.start
            spans = [s for s in spans if s.end <= hold]
        findings, text = apply_spans(raw[base:hold], [
            Span(s.start - base, s.end - base, s.category, s.scanner, s.score, s.label)
            for s in spans], self.policy)
        self.context = (self.context + raw[base:hold])[-self.context_chars:]
        self.pending = raw[hold:]
        if block is not None:
            self.is_blocked = True
            self.pending = ""
            blocked = finding(block, self.policy)
            return Release(text, (*findings, blocked), blocked, num_raw_chars=hold - base)
        return Release(text, tuple(findings), num_raw_chars=hold - base)
