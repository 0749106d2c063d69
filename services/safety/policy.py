"""Per-tenant safety policy, from one YAML file (``deploy/safety/policy.yaml``).

A policy says which scanners run on prompts and on generated text, the embedding
threshold, and the action for each category: allow, redact or block. A tenant's entry
overrides the default's keys; its ``actions`` are merged into the default's. A category
with no action of its own takes its family's (``pii`` for ``pii.email``), else allow.

Lexicons (the content categories: phrases and patterns) live in their own YAML file named
by ``lexicons`` (relative to the policy file); a tenant may add categories of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from services.safety.content import (
    Lexicon,
    LexiconEntry,
    LexiconError,
    compile_lexicon,
    parse_lexicon,
)


class PolicyError(ValueError):
    """A policy file that cannot be used; the message says what to fix."""


class Action(StrEnum):
    ALLOW = "allow"
    REDACT = "redact"
    BLOCK = "block"


class Scanner(StrEnum):
    INJECTION = "injection"  # prompt-injection rules over normalized and decoded text
    # The learned signal over MiniLM: the injection classifier (classifier.py) where the
    # service has one, else similarity to the exemplar attacks (embedding_threshold).
    EMBEDDING = "embedding"
    CONTENT = "content"  # the lexicon categories (violence, self-harm, ...)
    SECRETS = "secrets"  # API keys, private keys, passwords
    PII = "pii"  # e-mail, phone, card, IBAN, national id, IP address


PROMPT_INJECTION = "prompt_injection"
_STRICTNESS = {Action.ALLOW: 0, Action.REDACT: 1, Action.BLOCK: 2}


def strictest(actions: list[Action]) -> Action:
    return max(actions, key=_STRICTNESS.__getitem__, default=Action.ALLOW)


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    name: str  # the tenant, or "default"
    prompt_scanners: frozenset[Scanner]
    output_scanners: frozenset[Scanner]
    actions: Mapping[str, Action]  # category (or family, e.g. "pii") → action
    # Cosine similarity to an exemplar attack at which a prompt counts as one (only where
    # the service runs no classifier: with one, its calibrated threshold decides).
    embedding_threshold: float
    lexicon: Lexicon = field(default_factory=Lexicon)  # the content categories it checks

    def action(self, category: str) -> Action:
        if category in self.actions:
            return self.actions[category]
        return self.actions.get(category.split(".", 1)[0], Action.ALLOW)


@dataclass(frozen=True, slots=True)
class PolicySet:
    default: TenantPolicy
    tenants: Mapping[str, TenantPolicy]
    require_tenant_policy: bool = False  # True: an unknown tenant is refused (NOT_FOUND)

    def for_tenant(self, tenant: str) -> TenantPolicy | None:
        """The tenant's policy; the default for an unknown tenant, or None when the set
        requires every tenant to have its own."""
        if tenant in self.tenants:
            return self.tenants[tenant]
        return None if (tenant and self.require_tenant_policy) else self.default


_KNOWN_KEYS = {"prompt_scanners", "output_scanners", "actions", "embedding_threshold",
               "lexicon"}


def _scanners(value: Any, where: str) -> frozenset[Scanner]:
    if not isinstance(value, list):
        raise PolicyError(f"{where}: expected a list of scanners")
    try:
        return frozenset(Scanner(v) for v in value)
    except ValueError:
        known = ", ".join(s.value for s in Scanner)
        raise PolicyError(f"{where}: unknown scanner in {value} (known: {known})") from None


def _actions(value: Any, where: str) -> dict[str, Action]:
    if not isinstance(value, dict):
        raise PolicyError(f"{where}: expected a mapping of category to action")
    try:
        return {str(k): Action(str(v)) for k, v in value.items()}
    except ValueError:
        raise PolicyError(f"{where}: actions must be allow, redact or block, got {value}"
                          ) from None


def _tenant(name: str, raw: Mapping[str, Any], base: TenantPolicy | None,
            base_lexicon: Mapping[str, LexiconEntry]) -> TenantPolicy:
    unknown = set(raw) - _KNOWN_KEYS
    if unknown:
        raise PolicyError(f"policy {name}: unknown keys {sorted(unknown)} "
                          f"(known: {sorted(_KNOWN_KEYS)})")
    where = f"policy {name}"
    prompt = (_scanners(raw["prompt_scanners"], f"{where}.prompt_scanners")
              if "prompt_scanners" in raw else base.prompt_scanners if base else frozenset())
    output = (_scanners(raw["output_scanners"], f"{where}.output_scanners")
              if "output_scanners" in raw else base.output_scanners if base else frozenset())
    actions = dict(base.actions) if base else {}
    actions.update(_actions(raw.get("actions", {}), f"{where}.actions"))
    threshold = float(raw.get("embedding_threshold",
                              base.embedding_threshold if base else 0.75))
    if not 0.0 < threshold <= 1.0:
        raise PolicyError(f"{where}.embedding_threshold must be within (0, 1], got {threshold}")
    try:
        own = parse_lexicon(raw.get("lexicon") or {})
        lexicon = compile_lexicon({**(base.lexicon.entries if base else base_lexicon), **own})
    except LexiconError as exc:
        raise PolicyError(f"{where}.lexicon: {exc}") from None
    return TenantPolicy(name, prompt, output, actions, threshold, lexicon)


def parse(raw: Any, *, base_dir: Path) -> PolicySet:
    if not isinstance(raw, dict) or "default" not in raw:
        raise PolicyError("a policy file needs a 'default' policy")
    lexicon_raw: dict[str, LexiconEntry] = {}
    if raw.get("lexicons"):
        path = base_dir / str(raw["lexicons"])
        try:
            lexicon_raw = parse_lexicon(yaml.safe_load(path.read_text()) or {})
        except OSError as exc:
            raise PolicyError(f"cannot read the lexicons file {path}: {exc}") from None
        except LexiconError as exc:
            raise PolicyError(f"lexicons file {path}: {exc}") from None
    default = _tenant("default", raw["default"] or {}, None, lexicon_raw)
    tenants = {}
    for name, entry in (raw.get("tenants") or {}).items():
        tenants[str(name)] = _tenant(str(name), entry or {}, default, lexicon_raw)
    return PolicySet(default, tenants, bool(raw.get("require_tenant_policy", False)))


def load(path: Path) -> PolicySet:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PolicyError(f"cannot read the safety policy {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"the safety policy {path} is not valid YAML: {exc}") from None
    return parse(raw, base_dir=path.parent)
