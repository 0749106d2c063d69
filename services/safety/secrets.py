"""Detectors for credentials: cloud and SaaS tokens with a recognisable prefix, JWTs, PEM
private keys, and values assigned to names like ``password`` or ``api_key``.

Prefixed tokens are matched whole. For assignments only the *value* is matched (the name
sits in a variable-length lookbehind, which the ``regex`` module allows), so redaction
keeps ``password = [SECRET]`` readable. Values that only stand in for a secret
(``<your password>``, ``********``, ``YOUR_API_KEY``, ``${PASSWORD}``, ``os.environ[...]``)
are rejected by the validate functions, not by the patterns, to keep the patterns simple.

Every repetition is bounded and lookbehinds scan at most a few characters of blanks, so
scanning stays linear on long runs of spaces or token characters. This module shares its
name with the standard library's ``secrets``; import it as ``services.safety.secrets``.
"""

from __future__ import annotations

import re

import regex

from services.safety.scanners import Detector

SCANNER = "secrets"
CATEGORY = "secret"
LABEL = "[SECRET]"

# Names whose assigned value is a credential. "db_password" and "DB_PASSWORD" match too:
# an underscore or dash may precede the name, a letter or digit may not.
_NAMES = (r"password|passwd|secret|client[_-]?secret|secret[_-]?key|secret[_-]?access[_-]?key"
          r"|api[_-]?key|apikey|access[_-]?token|auth[_-]?token|private[_-]?key")
_SECRET_NAMES = rf"(?<![A-Za-z0-9])(?i:{_NAMES})"
# Every name above holds one of these.
_NAME_ANCHORS = ("pass", "secret", "key", "token")
# name, optional closing quote of a quoted key ("password": ...), then ":" or "=".
# "==" never matches, so comparisons are not assignments.
_ASSIGN = r"""["']?[ \t]{0,3}[:=][ \t]{0,3}"""

# Whole values that only name a secret, compared after lower-casing and dropping
# punctuation ("<password>", "change-me"); "password123" is a real, if weak, password.
_PLACEHOLDER_WORDS = frozenset({
    "password", "passwd", "secret", "apikey", "token", "changeme", "example",
    "placeholder", "redacted", "removed", "hidden", "masked", "notset", "none", "null",
    "undefined", "todo", "fixme", "dummy", "sample",
})  # fmt: skip
_MASK_CHARS = frozenset("*xX•.-_#?")
_CONSTANT_NAME = regex.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+")  # YOUR_API_KEY, DB_PASS
_CALL_OR_SUBSCRIPT = regex.compile(r"[A-Za-z_][\w.]*[(\[]")  # getpass(), os.environ[, Optional[
_ATTRIBUTE = regex.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")  # self.password, settings.KEY


def is_placeholder(value: str) -> bool:
    """True for values that stand in for a secret rather than being one."""
    if value[0] in "$%<{" or value.startswith("#{"):  # ${X}, %(x)s, <your key>, {{ x }}
        return True
    if set(value) <= _MASK_CHARS:  # ********, xxxxxx, XXXX-XXXX
        return True
    lowered = value.lower()
    if "your" in lowered or "example" in lowered or "placeholder" in lowered:
        return True
    alnum = "".join(c for c in lowered if c.isalnum())
    return alnum in _PLACEHOLDER_WORDS or _CONSTANT_NAME.fullmatch(value) is not None


def is_quoted_secret(value: str) -> bool:
    """A quoted value is taken unless it is a placeholder: in code, any literal can be a
    password."""
    return not value.isspace() and not is_placeholder(value.strip())


def is_unquoted_secret(value: str) -> bool:
    """An unquoted value (YAML, .env, prose) must also not read as a word or as code:
    ``password: incorrect`` or ``api_key: string`` is text or a type, ``hunter22`` is not.
    """
    if is_placeholder(value) or _CALL_OR_SUBSCRIPT.match(value) or _ATTRIBUTE.fullmatch(value):
        return False
    has_non_letter = not value.isalpha()
    is_mixed_case = value[1:] != value[1:].lower() and value != value.upper()
    return has_non_letter or is_mixed_case


def looks_random(value: str) -> bool:
    """Has a digit, an upper and a lower case letter: true of almost every generated key of
    20+ characters, false of slugs like ``sk-learn-is-a-python-library``."""
    return (any(c.isdigit() for c in value) and any(c.isupper() for c in value)
            and any(c.islower() for c in value))


def has_digit(value: str) -> bool:
    """Real Slack tokens carry numeric team and user ids; ``xoxb-your-token-here`` does not."""
    return any(c.isdigit() for c in value)


_AWS_ACCESS_KEY_ID = regex.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])")

# 40 base64 characters, only where a name says it is an AWS secret key (unlabelled, any
# 40-character base64 string would match: hashes, ids, encoded data).
_AWS_NAMES = r"aws[_-]?secret(?:[_-]?access)?[_-]?key|secret[_-]?access[_-]?key"
_AWS_SECRET_KEY = regex.compile(
    rf"(?<=(?<![A-Za-z0-9])(?i:{_AWS_NAMES})" + _ASSIGN + r"""["']?)"""
    r"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"
)

_GITHUB_TOKEN = regex.compile(
    r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{22,244})"
    r"(?![A-Za-z0-9_])"
)

_SLACK_TOKEN = regex.compile(r"(?<![\w-])xox[abprs]-[A-Za-z0-9-]{10,250}(?![\w-])")

_STRIPE_KEY = regex.compile(r"(?<![\w-])(?:sk|rk)_live_[A-Za-z0-9]{16,247}(?![\w-])")

_GOOGLE_API_KEY = regex.compile(r"(?<![\w-])AIza[0-9A-Za-z_-]{35}(?![\w-])")

_OPENAI_KEY = regex.compile(
    r"(?<![\w-])sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,256}(?![\w-])"
)

# header.payload.signature, base64url; the header is JSON, so it starts "eyJ" ('{"').
# Possessive runs: each part ends at the first non-base64url character, no backtracking.
_JWT = regex.compile(
    r"(?<![\w-])eyJ[A-Za-z0-9_-]{10,}+\.[A-Za-z0-9_-]{2,}+\.[A-Za-z0-9_-]{16,}+"
    r"(?![\w-]|\.[\w-])"
)

# The whole armoured block. The body is bounded (an RSA-4096 key is about 3,300
# characters), so a BEGIN line with no END cannot make the scan quadratic.
#
# A block cut off before its END line (a truncated paste) still leaks key material: then
# the BEGIN line and the lines after it that read as base64 or as PEM headers
# ("Proc-Type: 4,ENCRYPTED") are matched. With partial=True the regex module prefers
# that complete match to the partial one still waiting for END, so when a stream chunk
# ends inside a line (a header, the END line, a CR before its LF) the match takes that
# partial line too: it must reach the end of the text for the block to stay pending.
# One body line, whole: base64, a header ("DEK-Info: AES-128-CBC,..."), or blank.
_PEM_LINE = (r"(?:[A-Za-z0-9+/=]{1,128}+|[A-Z][A-Za-z-]{1,30}: [^\r\n]{0,128}+)?"
             r"(?=[ \t]*(?:\r?\n|\Z))")
_PEM_PRIVATE_KEY = regex.compile(
    r"-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----"
    r"(?:"
    r"[\s\S]{0,16384}?-----END (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----"
    rf"|(?:[ \t]*\r?\n{_PEM_LINE}){{1,512}}+"
    # a line still arriving: base64, a header, or the END line
    r"(?:[ \t]*\r?\n?(?:[A-Za-z0-9+/=]{0,128}+|[A-Z][A-Za-z-]{0,30}(?::[^\r\n]{0,128}+)?"
    r"|-{1,5}(?:END[A-Z0-9 -]{0,40}|EN?)?)[ \t]*\r?\Z)?"
    r")"
)

# The value of a name = "value" assignment, up to the matching closing quote.
_QUOTED_ASSIGNMENT = regex.compile(
    r"(?<=" + _SECRET_NAMES + _ASSIGN + r"""(?P<quote>["'`]))"""
    r"(?:(?!(?P=quote))[^\r\n]){6,256}"
    r"(?=(?P=quote))"
)

# The value of a name: value assignment, up to whitespace or a quote, and not ending in
# punctuation that closes a sentence or a bracket ("password: hunter22." ends at the 2).
_UNQUOTED_ASSIGNMENT = regex.compile(
    r"(?<=" + _SECRET_NAMES + _ASSIGN + r")"
    r"""(?!["'`])[^\s"'`]{5,255}[^\s"'`.,;:)\]}>]"""
)


# What the assignment detectors' lookbehinds read, as forward patterns over the case-folded
# text (Detector.context): a text without a name assigned is not scanned.
_AWS_CONTEXT = re.compile(rf"(?:{_AWS_NAMES}){_ASSIGN}")
_NAMES_CONTEXT = re.compile(rf"(?:{_NAMES}){_ASSIGN}")

SECRET_DETECTORS: tuple[Detector, ...] = (
    Detector(CATEGORY, SCANNER, _AWS_ACCESS_KEY_ID, LABEL),
    Detector(CATEGORY, SCANNER, _AWS_SECRET_KEY, LABEL, looks_random, anchors=("key",),
             context=_AWS_CONTEXT),
    Detector(CATEGORY, SCANNER, _GITHUB_TOKEN, LABEL),
    Detector(CATEGORY, SCANNER, _SLACK_TOKEN, LABEL, has_digit),
    Detector(CATEGORY, SCANNER, _STRIPE_KEY, LABEL),
    Detector(CATEGORY, SCANNER, _GOOGLE_API_KEY, LABEL),
    Detector(CATEGORY, SCANNER, _OPENAI_KEY, LABEL, looks_random),
    Detector(CATEGORY, SCANNER, _JWT, LABEL),
    Detector(CATEGORY, SCANNER, _PEM_PRIVATE_KEY, LABEL),
    Detector(CATEGORY, SCANNER, _QUOTED_ASSIGNMENT, LABEL, is_quoted_secret,
             anchors=_NAME_ANCHORS, context=_NAMES_CONTEXT),
    Detector(CATEGORY, SCANNER, _UNQUOTED_ASSIGNMENT, LABEL, is_unquoted_secret,
             anchors=_NAME_ANCHORS, context=_NAMES_CONTEXT),
)
