"""The policy file: tenants override the default, categories fall back to their family,
and a bad file says what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.safety import policy as policies
from services.safety.policy import Action, PolicyError, PolicySet, Scanner
from tests.services.safety.conftest import write_policy

POLICY = """
default:
  prompt_scanners: [injection, pii]
  output_scanners: [pii]
  embedding_threshold: 0.7
  actions: {prompt_injection: block, pii: redact, pii.ip: allow}
  lexicon:
    fruit: [green apple]
tenants:
  acme:
    actions: {pii: block}
    lexicon:
      colors: {phrases: [deep purple], patterns: ['ultra ?violet']}
  open:
    prompt_scanners: []
"""


def test_the_repository_policy_loads(repo_policies: PolicySet) -> None:
    dev = repo_policies.for_tenant("dev")
    assert dev is not None
    assert Scanner.EMBEDDING in dev.prompt_scanners
    assert dev.action("prompt_injection") == Action.BLOCK
    assert dev.action("pii.email") == Action.REDACT
    assert {d.category for d in dev.lexicon.detectors} >= {
        "violence", "self_harm", "hate", "sexual_minors", "weapons"}


def test_tenants_override_the_default(tmp_path: Path) -> None:
    ps = policies.load(write_policy(tmp_path, POLICY))
    acme, default = ps.tenants["acme"], ps.default
    assert default.action("pii.email") == Action.REDACT  # the family's action
    assert default.action("pii.ip") == Action.ALLOW  # its own
    assert default.action("violence") == Action.ALLOW  # nothing said: allow
    assert acme.action("pii.email") == Action.BLOCK
    assert acme.action("prompt_injection") == Action.BLOCK  # kept from the default
    assert acme.prompt_scanners == default.prompt_scanners
    assert ps.tenants["open"].prompt_scanners == frozenset()
    # A tenant's lexicon adds to the default's.
    assert {d.category for d in acme.lexicon.detectors} == {"fruit", "colors"}
    spans = acme.lexicon.scan("Deep   Purple and ULTRAVIOLET and a gr33n apple")
    assert [s.category for s in spans] == ["colors", "colors", "fruit"]


def test_unknown_tenants_get_the_default_unless_required(tmp_path: Path) -> None:
    ps = policies.load(write_policy(tmp_path, POLICY))
    assert ps.for_tenant("nobody") is ps.default
    strict = policies.load(write_policy(tmp_path, "require_tenant_policy: true\n" + POLICY))
    assert strict.for_tenant("nobody") is None
    assert strict.for_tenant("acme") is not None


@pytest.mark.parametrize(("text", "message"), [
    ("tenants: {}", "needs a 'default'"),
    ("default: {prompt_scanners: [magic]}", "unknown scanner"),
    ("default: {actions: {pii: shred}}", "allow, redact or block"),
    ("default: {embedding_threshold: 1.5}", "within (0, 1]"),
    ("default: {colour: red}", "unknown keys"),
    ("default: {lexicon: {bad: {patterns: ['(']}}}", "bad pattern"),
    ("default: [", "not valid YAML"),
])
def test_bad_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("(", r"\(").replace("]", r"\]")):
        policies.load(write_policy(tmp_path, text))

