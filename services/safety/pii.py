"""Detectors for personal data (emails, phone numbers, payment cards, IBANs, national ids,
IP addresses) and ``redact``, which swaps found spans for their labels.

Each pattern is written for two jobs. On a whole text it must find candidates in roughly
linear time, so every repetition is bounded or possessive and no two alternatives can
split the same run of characters in many ways (a 20,000-character run of digits and
spaces is the case to keep cheap). On a stream, ``Detector.pending_start`` matches
partially at the end of the text, so a pattern must also *start* where the value starts:
the leading lookbehinds refuse to begin inside a longer word or digit run, which both
keeps a card number in a 25-digit id from being split out and keeps the held-back tail
of ordinary prose short.

Checksums and lengths that a regex cannot express (Luhn, ISO 13616 mod-97, the Spanish
id letter, digit counts) live in the ``validate`` functions, which see the whole match.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

import regex

from services.safety.scanners import Detector, Span

SCANNER = "pii"

# ISO 13616 lengths (country code and check digits included): every SEPA country, plus a
# few common non-SEPA ones. A country missing here is not reported as an IBAN.
IBAN_LENGTHS: Mapping[str, int] = {
    # SEPA
    "AD": 24, "AT": 20, "BE": 16, "BG": 22, "CH": 21, "CY": 28, "CZ": 24, "DE": 22,
    "DK": 18, "EE": 20, "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GI": 23, "GR": 27,
    "HR": 21, "HU": 28, "IE": 22, "IS": 26, "IT": 27, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "MC": 27, "MT": 31, "NL": 18, "NO": 15, "PL": 28, "PT": 25, "RO": 24,
    "SE": 24, "SI": 19, "SK": 24, "SM": 27, "VA": 22,
    # outside SEPA
    "AE": 23, "AL": 28, "BA": 20, "BR": 29, "IL": 23, "ME": 22, "MK": 19, "RS": 22,
    "SA": 24, "TR": 26, "UA": 29,
}  # fmt: skip

# Control letter of a Spanish DNI/NIE: the number modulo 23 indexes this string.
_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"
_NIE_PREFIX_DIGITS = {"X": "0", "Y": "1", "Z": "2"}
_PHONE_SEPARATORS = regex.compile(r"[ .()-]+")


# --- validators ---------------------------------------------------------------------------


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def is_luhn_valid(number: str) -> bool:
    """Luhn (mod 10) check over the digits of ``number``; separators are ignored."""
    digits = _digits(number)
    if not digits:
        return False
    total = 0
    # Double every second digit counting from the right (the check digit is not doubled).
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def is_card_number(text: str) -> bool:
    """13-19 digits, Luhn-valid, and not starting with 0 (no card network issues those,
    while zero-padded ids are common)."""
    digits = _digits(text)
    return 13 <= len(digits) <= 19 and digits[0] != "0" and is_luhn_valid(digits)


def is_iban_valid(text: str) -> bool:
    """ISO 13616: known country, that country's length, and mod-97 of the rearranged
    number equal to 1. Spaces are ignored; letters must be upper case."""
    iban = text.replace(" ", "")
    if len(iban) < 5 or not iban.isalnum() or not iban.isascii():
        return False
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban[2:4].isdigit():
        return False
    # Move country code and check digits to the end; letters become 10..35.
    rearranged = iban[4:] + iban[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


def is_spanish_id_valid(text: str) -> bool:
    """Spanish DNI (8 digits + letter) or NIE (X/Y/Z + 7 digits + letter): the letter must
    be the one the number selects modulo 23."""
    value = text.replace("-", "").upper()
    if len(value) != 9:
        return False
    number = _NIE_PREFIX_DIGITS.get(value[0], value[0]) + value[1:8]
    return number.isdigit() and _DNI_LETTERS[int(number) % 23] == value[8]


def is_international_phone(text: str) -> bool:
    """A ``+CC ...`` candidate with 8-15 digits (E.164 allows at most 15) that is not a
    signed number written with thousands separators (``+12.345.678``)."""
    num_digits = len(_digits(text))
    if not 8 <= num_digits <= 15:
        return False
    groups = _PHONE_SEPARATORS.split(text.lstrip("+"))
    is_thousands = "." in text and all(len(g) == 3 for g in groups[1:] if g)
    return not is_thousands


def is_national_phone(text: str) -> bool:
    """A trunk-prefixed national number (UK, DE, FR): 9-12 digits."""
    return 9 <= len(_digits(text)) <= 12


def is_ipv6(text: str) -> bool:
    """A real IPv6 address with at least one decimal digit, so hex-only words joined by
    colons (``dead::beef``, ``Ab::Cd``) are left alone."""
    if not any(c.isdigit() for c in text):
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


# --- patterns -----------------------------------------------------------------------------

# _AT_END: with partial=True the regex module prefers a complete match to a partial one.
# A stream chunk ending "+44 20 " or "DE89 3704 0044 " holds a complete match ("+44 20",
# too short to be reported) that stops before the separator, so nothing would be pending
# and the start of the number would be released. Patterns whose values are written in
# groups therefore also take a separator (and a few digits) that ends the text, which
# keeps the whole candidate pending. On a finished text the cost is a trailing space
# inside the span. A trailing "." is left out: it usually ends a sentence.

_EMAIL = regex.compile(
    r"(?<![\w.%+-])"  # start at the first character of the local part
    r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}"
    r"@(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,63}"
    r"(?![\w-]|\.[A-Za-z0-9])"  # not cut short inside a longer domain
)

# "+CC" followed by digit groups with single separators. Possessive groups make the
# split of a digit run unique, so a long run of digits and spaces cannot backtrack.
_PHONE_INTERNATIONAL = regex.compile(
    r"(?<![\w+]|\d[ .-])"
    r"\+[1-9]\d{0,2}+"
    r"(?:[ .-]?\(\d{1,4}\))?"  # area code or trunk in parentheses: +44 (0)20 ...
    r"[ .-]?\d++"
    r"(?:[ .-]\d++){0,5}+"
    r"(?![\w+]|[.,]\d)"  # "+12.345.678,90" is an amount, not a phone
    r"(?:[ -]\Z)?"  # see _AT_END
)

# US/NANP: (555) 123-4567, 555-123-4567, 555.123.4567, 1-800-555-0199. Bare ten-digit
# runs are not taken: nothing but the digits would say "phone".
_PHONE_US = regex.compile(
    r"(?=[1(2-9])"  # the first character, checked before the slower lookbehind
    r"(?<![\w+.-]|\d[ .-])"
    r"(?:1[ .-])?"
    r"(?:\([2-9]\d{2}\)[ ]?\d{3}[ .-]|[2-9]\d{2}(?P<sep>[.-])\d{3}(?P=sep))"
    r"\d{4}"
    r"(?![\w]|[.-]?\d)"
)

# Trunk-prefixed European numbers, always with separators: UK 020 7946 0958, 07700 900123,
# DE 030 1234567, 030/1234567, FR 06 12 34 56 78. Starting at "0" and needing 9+ digits
# keeps dates (01.02.2024, 05-10-2024) and ordinary quantities out.
_PHONE_NATIONAL = regex.compile(
    r"(?<![\w+.,/-]|\d[ .-])"
    r"(?:"
    r"0[1-9](?P<fr>[ .-])\d{2}(?:(?P=fr)\d{2}){3}"  # FR: five pairs
    r"|0[1-9]\d{1,3}+ \d{3,8}+(?: \d{3,4}+)?"  # UK / DE with spaces
    r"|0[1-9]\d{1,3}+[/-]\d{5,8}+"  # DE 030/1234567, 030-1234567
    r")"
    r"(?![\w/]|[.,-]?\d)"
    r"(?:[ /-]\d{0,3}\Z)?"  # see _AT_END: "020 7946 0" is still growing
)

# Either one unbroken run, or the groupings printed on cards: 4-4-4-(1..4) for Visa,
# Mastercard, Discover; 4-6-(4|5) for Diners and Amex. A group of four more digits
# after the match means a longer number, not a card followed by text.
_CARD = regex.compile(
    r"(?<![\w.,+-]|\d[ -])"
    r"(?:"
    r"\d{13,19}"
    r"|\d{4}(?P<g>[ -])\d{4}(?P=g)\d{4}(?P=g)\d{1,4}"
    r"|\d{4}(?P<a>[ -])\d{6}(?P=a)\d{4,5}"
    r")"
    r"(?!\w|[.,]\d|[ -]\d{4})"
)

# Country, check digits, then the BBAN compact or in groups of four (the last group may be
# shorter). Country lengths and mod-97 are checked by is_iban_valid.
_IBAN = regex.compile(
    r"(?<!\w)"
    r"[A-Z]{2}\d{2}"
    r"(?:[ ]?[A-Z0-9]{4}){2,7}+"
    r"(?:[ ]?[A-Z0-9]{1,3})?"
    r"(?!\w)"
    r"(?:[ ]\Z)?"  # see _AT_END
)

# US SSN with the ranges the SSA never issues: area 000, 666, 9xx; group 00; serial 0000.
_SSN = regex.compile(
    r"(?<![\w-])"
    r"(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}"
    r"(?![\w-]|\.\d)"
)

# UK National Insurance number: the first letter is never D F I Q U V, the second never
# D F I O Q U V, and the prefixes BG GB KN NK NT TN ZZ are not allocated.
_NINO = regex.compile(
    r"(?<!\w)"
    r"(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
    r" ?\d{2} ?\d{2} ?\d{2} ?[A-D]"
    r"(?!\w)"
)

_SPANISH_ID = regex.compile(r"(?<![\w-])(?:\d{8}|[XYZ]\d{7})-?[A-Z](?![\w-])")

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"

# Four dotted octets, not part of a longer dotted run ("1.2.3.4.5") and not announced as
# a version ("version 1.2.3.4"); three-part versions never match at all.
_IPV4 = regex.compile(
    r"(?<![\w.])"
    r"(?<!\b(?i:v|ver|version|release)[.:]?[ \t]{1,2})"
    rf"{_OCTET}(?:\.{_OCTET}){{3}}"
    r"(?!\w|\.\d)"
)

# A loose IPv6 shape (hex groups and colons, optionally ending in IPv4); is_ipv6 decides.
_IPV6 = regex.compile(
    r"(?<![\w:.])"
    r"(?:[0-9A-Fa-f]{0,4}:){2,7}"
    rf"(?:{_OCTET}(?:\.{_OCTET}){{3}}|[0-9A-Fa-f]{{0,4}})"
    r"(?![\w:]|\.\d)"
)


PII_DETECTORS: tuple[Detector, ...] = (
    Detector("pii.email", SCANNER, _EMAIL, "[EMAIL]"),
    Detector("pii.phone", SCANNER, _PHONE_INTERNATIONAL, "[PHONE]", is_international_phone),
    Detector("pii.phone", SCANNER, _PHONE_US, "[PHONE]"),
    Detector("pii.phone", SCANNER, _PHONE_NATIONAL, "[PHONE]", is_national_phone),
    Detector("pii.card", SCANNER, _CARD, "[CARD]", is_card_number),
    Detector("pii.iban", SCANNER, _IBAN, "[IBAN]", is_iban_valid),
    Detector("pii.national_id", SCANNER, _SSN, "[NATIONAL_ID]"),
    Detector("pii.national_id", SCANNER, _NINO, "[NATIONAL_ID]"),
    Detector("pii.national_id", SCANNER, _SPANISH_ID, "[NATIONAL_ID]", is_spanish_id_valid),
    Detector("pii.ip", SCANNER, _IPV4, "[IP]"),
    Detector("pii.ip", SCANNER, _IPV6, "[IP]", is_ipv6),
)


# --- redaction ----------------------------------------------------------------------------


def redact(text: str, spans: Sequence[Span]) -> str:
    """``text`` with each kept span replaced by its label (``[REDACTED]`` if it has none).

    Spans may come from several detectors and overlap (an IBAN's digits may also look
    like a card). Of overlapping spans the one that starts first is kept, and of those
    starting together the longest; the spans it overlaps are dropped whole, so two labels
    never cut one value into pieces.
    """
    pieces: list[str] = []
    end = 0  # everything before ``end`` is already in ``pieces``
    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        if span.start < end or span.end <= span.start:
            continue
        pieces.append(text[end:span.start])
        pieces.append(span.label or "[REDACTED]")
        end = span.end
    pieces.append(text[end:])
    return "".join(pieces)
