"""Checks a whole text (a prompt) against a tenant's policy: every scanner the policy
names, one decision. The stream moderator (``stream.py``) does the same for generated
text arriving in chunks.

A check runs in two steps so that prompts checked together share one embedding call
(``batcher.py``): ``scan`` runs the rule scanners on one prompt and says which texts the
embedding signal needs; ``check_many`` embeds every scanned prompt's texts at once and
decides each prompt. ``check`` is the same for one prompt. With the classifier, the
scores of texts seen before (a system prompt sent with every request) come from
``score_cache.py`` instead of the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.safety import injection
from services.safety.classifier import InjectionClassifier, prompt_texts, whole_prompt_texts
from services.safety.embedding import Embedder, Similarity
from services.safety.normalize import fold
from services.safety.pii import PII_DETECTORS, redact
from services.safety.policy import PROMPT_INJECTION, Action, Scanner, TenantPolicy, strictest
from services.safety.prefilter import RulePrefilter
from services.safety.scanners import Detector, Span
from services.safety.score_cache import MAX_TEXTS, ScoreCache, TextScore, text_scores
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


@dataclass(frozen=True, slots=True)
class RuleScan:
    """One prompt after the rule scanners: all its decision but the embedding signal."""

    policy: TenantPolicy
    rule_findings: tuple[Finding, ...]  # the prompt-injection rules' findings
    span_findings: tuple[Finding, ...]  # content, secrets and PII
    text: str  # the text to use: the input, with the spans the policy redacts redacted
    # The texts the learned signal reads (``classifier.prompt_texts``: the classifier's, or
    # without one what is compared with the exemplars; may be empty); None when it does
    # not run: no model, not in the policy, or a rule already settled the matter (unless
    # a classifier that reads the whole prompt may clear the rule's hit).
    embedding_texts: tuple[str, ...] | None
    # The classifier reads every part of the prompt, so it may clear a rule's hit.
    is_read_whole: bool = False
    scope: str = ""  # whose texts these are (the tenant): the score cache's scope


@dataclass(frozen=True, slots=True)
class Learned:
    """The learned signal of one prompt: the classifier's score or, without a classifier,
    the nearest exemplar attack. With a classifier the exemplar signal does not run:
    beside it, it added about as many false positives as attacks found, and the encoder's
    layers it needs would cost as much again as the classifier's."""

    similarity: Similarity | None  # the nearest exemplar attack; None with a classifier
    classifier_score: float | None  # the classifier's probability; None without one
    uncut: bool = False  # the classifier read each text whole (none hit the token limit)


class PromptChecker:
    """Scans prompts; owns the (optional) embedding model and injection classifier (the
    classifier reads the states of the embedding model's lower layers, so it runs only
    with one)."""

    def __init__(self, embedder: Embedder | None,
                 classifier: InjectionClassifier | None = None, *,
                 cache_texts: int = MAX_TEXTS, prefilter: RulePrefilter | None = None
                 ) -> None:
        self.embedder = embedder
        self.classifier = classifier
        self.scores = ScoreCache(cache_texts)  # the classifier's, per text (0: none kept)
        # Names the rules that may match a view: the same hits, fewer rules tried.
        self.prefilter = prefilter

    def check(self, text: str, policy: TenantPolicy, *, scope: str = "") -> Decision:
        return self.check_many([self.scan(text, policy, scope=scope)])[0]

    def scan(self, text: str, policy: TenantPolicy, *, scope: str = "") -> RuleScan:
        """``scope``: whose text it is (the tenant); cached scores are kept per scope."""
        scanners = policy.prompt_scanners
        rule_findings: list[Finding] = []
        folded = fold(text) if scanners & {Scanner.INJECTION, Scanner.CONTENT} else None
        is_veto_proof = False
        if Scanner.INJECTION in scanners:
            hits = injection.hits(text, folded.text if folded else None,
                                  candidates=self.prefilter.candidates if self.prefilter
                                  else None)
            is_veto_proof = hits.is_veto_proof
            for family in hits.families:
                rule_findings.append(Finding(PROMPT_INJECTION, Scanner.INJECTION.value, 1.0,
                                             policy.action(PROMPT_INJECTION), family))
        # The embedding costs milliseconds: skip it when a rule already settled the matter.
        embedding_texts: tuple[str, ...] | None = None
        is_read_whole = False
        if Scanner.EMBEDDING in scanners and self.embedder is not None:
            folded_text = folded.text if folded else None
            if not rule_findings:
                embedding_texts = tuple(prompt_texts(
                    self.embedder, text, folded_text,
                    with_sentences=self.classifier is not None))
            elif self.classifier is not None and not is_veto_proof:
                # A rule's hit may be cleared only by a classifier that reads the whole
                # prompt, and not a veto-proof one (``injection.Hits``).
                whole = whole_prompt_texts(self.embedder, text, folded_text)
                is_read_whole = whole is not None
                embedding_texts = None if whole is None else tuple(whole)
        spans: list[Span] = []
        if Scanner.CONTENT in scanners:
            spans += policy.lexicon.scan(text, folded)
        for d in detectors_for(scanners):
            spans += d.find(text)
        span_findings, redacted = apply_spans(text, spans, policy)
        return RuleScan(policy, tuple(rule_findings), tuple(span_findings), redacted,
                        embedding_texts, is_read_whole, scope)

    def check_many(self, scans: Sequence[RuleScan]) -> list[Decision]:
        """The decision for each of ``scans``, with one embedding call for the texts of
        all of them that need it."""
        needing = [(s.scope, s.embedding_texts) for s in scans if s.embedding_texts is not None]
        learned = iter(self.learn([texts for _, texts in needing],
                                  [scope for scope, _ in needing]))
        threshold, veto = ((self.classifier.threshold, self.classifier.veto) if self.classifier
                           else (1.0, 0.0))
        return [decide(s, None if s.embedding_texts is None else next(learned), threshold,
                       veto)
                for s in scans]

    def learn(self, texts_per_prompt: Sequence[Sequence[str]],
              scopes: Sequence[str] | None = None) -> list[Learned]:
        """The learned signals of each prompt's texts, from one embedding call (with the
        classifier: of the texts whose scores the cache does not hold under the prompt's
        scope, ``scopes[i]``; "" for all when None)."""
        embedder, classifier = self.embedder, self.classifier
        if not texts_per_prompt or embedder is None:
            return []
        if classifier is None:
            return [Learned(embedder.nearest_of(e), None)
                    for e in embedder.encode_prompts(texts_per_prompt)]

        def compute(texts: list[str]) -> list[TextScore]:  # one call, every text not held
            return text_scores(embedder.encode_scored([[t] for t in texts], classifier))

        scored = self.scores.scored(texts_per_prompt, scopes or [""] * len(texts_per_prompt),
                                    compute)
        return [Learned(None, classifier.score(s.probabilities), s.uncut) for s in scored]


def decide(scan: RuleScan, learned: Learned | None, classifier_threshold: float = 1.0,
           veto: float = 0.0) -> Decision:
    """``scan``'s decision, given the learned signal (None: it did not run): the rules,
    and the classifier at its calibrated threshold or, without one, the nearest exemplar
    at the policy's. A rule's hit that the classifier scores under ``veto`` is cleared,
    when the classifier read the whole prompt: it tells a quoted or discussed attack from
    one aimed at the model. (A veto-proof hit is never cleared: the classifier
    does not run on it, ``scan``.)"""
    policy = scan.policy
    findings = list(scan.rule_findings)
    action = policy.action(PROMPT_INJECTION)
    if learned is not None:
        similarity, score = learned.similarity, learned.classifier_score
        if score is None:  # no classifier: the exemplar signal (it runs on no rule hit)
            if similarity is not None and similarity.score >= policy.embedding_threshold:
                findings.append(Finding(PROMPT_INJECTION, Scanner.EMBEDDING.value,
                                        round(similarity.score, 4), action, similarity.family))
        elif findings:
            # A rule's hit stands, unless the classifier read the whole prompt (no part
            # of it left out, no text cut: padding cannot hide the attack from it) and
            # clears it.
            if score < veto and scan.is_read_whole and learned.uncut:
                findings = []
        elif score >= classifier_threshold:
            # The classifier names no attack family.
            findings.append(Finding(PROMPT_INJECTION, "classifier", round(score, 4), action))
    return Decision.of(findings + list(scan.span_findings), scan.text)
