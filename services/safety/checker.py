"""Checks a whole text (a prompt) against a tenant's policy: every scanner the policy
names, one decision. The stream moderator (``stream.py``) does the same for generated
text arriving in chunks."""

from __future__ import annotations

from dataclasses import dataclass

from services.safety import injection
from services.safety.embedding import Embedder
from services.safety.normalize import fold
from services.safety.pii import PII_DETECTORS, redact
from services.safety.policy import PROMPT_INJECTION, Action, Scanner, TenantPolicy, strictest
from services.safety.scanners import Detector, Span
from services.safety.secrets import SECRET_DETECTORS


@dataclass(frozen=True, slots=True)
class Finding:
    category: str  # e.g. "prompt_injection", "pii.email", "violence"
    scanner: str  # "injection", "embedding", "content", "secrets", "pii"
    score: float  # 0..1; 1 for an exact rule or a validated pattern
    action: Action  # what the policy does with this category
    family: str = ""  # the attack family, for prompt-injection findings


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action  # the strictest action among the findings; ALLOW when none
    findings: tuple[Finding, ...]
    text: str  # the text to use: the input, redacted when action is REDACT
    reason: str = ""  # with BLOCK: the blocking categories, never the text

    @staticmethod
    def of(findings: list[Finding], text: str) -> Decision:
        action = strictest([f.action for f in findings])
        blocked = sorted({f.category for f in findings if f.action == Action.BLOCK})
        return Decision(action, tuple(findings), text, ", ".join(blocked))


def detectors_for(scanners: frozenset[Scanner]) -> tuple[Detector, ...]:
    """The pattern detectors over the raw text (PII and secrets) that ``scanners`` name."""
    out: tuple[Detector, ...] = ()
    if Scanner.SECRETS in scanners:
        out += SECRET_DETECTORS
    if Scanner.PII in scanners:
        out += PII_DETECTORS
    return out


def finding(span: Span, policy: TenantPolicy) -> Finding:
    return Finding(span.category, span.scanner, span.score, policy.action(span.category))


def apply_spans(text: str, spans: list[Span], policy: TenantPolicy) -> tuple[list[Finding], str]:
    """Findings for ``spans``, and ``text`` with the spans the policy redacts redacted."""
    findings = [finding(s, policy) for s in spans]
    redacted = [s for s, f in zip(spans, findings, strict=True) if f.action == Action.REDACT]
    return findings, (redact(text, redacted) if redacted else text)


class PromptChecker:
    """Scans prompts; owns the (optional) embedding model."""

    def __init__(self, embedder: Embedder | None) -> None:
        self.embedder = embedder

    def check(self, text: str, policy: TenantPolicy) -> Decision:
        scanners = policy.prompt_scanners
        findings: list[Finding] = []
        folded = fold(text) if scanners & {Scanner.INJECTION, Scanner.CONTENT} else None
        if Scanner.INJECTION in scanners:
            for family in injection.scan(text, folded.text if folded else None):
                findings.append(Finding(PROMPT_INJECTION, Scanner.INJECTION.value, 1.0,
                                        policy.action(PROMPT_INJECTION), family))
        # The embedding costs milliseconds: skip it when a rule already settled the matter.
        if (Scanner.EMBEDDING in scanners and self.embedder is not None and not findings):
            sim = self.embedder.similarity(text, injection.hidden_texts(text))
            if sim.score >= policy.embedding_threshold:
                findings.append(Finding(PROMPT_INJECTION, Scanner.EMBEDDING.value,
                                        round(sim.score, 4), policy.action(PROMPT_INJECTION),
                                        sim.family))
        spans: list[Span] = []
        if Scanner.CONTENT in scanners:
            spans += policy.lexicon.scan(text, folded)
        for d in detectors_for(scanners):
            spans += d.find(text)
        span_findings, redacted = apply_spans(text, spans, policy)
        return Decision.of(findings + span_findings, redacted)
