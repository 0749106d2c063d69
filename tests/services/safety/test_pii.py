"""PII detectors: what each category catches and leaves alone (checksums, invalid ranges,
numbers that only look like phones or IPs), redaction, partial matches at the end of a
stream, and linear-time scanning of adversarial input."""

from __future__ import annotations

import pytest

from services.safety.pii import (
    IBAN_LENGTHS,
    PII_DETECTORS,
    is_card_number,
    is_iban_valid,
    is_luhn_valid,
    is_spanish_id_valid,
    redact,
)
from services.safety.scanners import Span
from tests.services.safety.conftest import best_of_three


def find(text: str) -> list[tuple[str, str]]:
    """(category, matched text) for every PII finding, in text order."""
    spans = [s for d in PII_DETECTORS for s in d.find(text)]
    return [(s.category, text[s.start:s.end]) for s in sorted(spans, key=lambda s: s.start)]


def categories(text: str) -> set[str]:
    return {category for category, _ in find(text)}


def pending_start(text: str) -> int | None:
    """Where the stream moderator would start holding text back: the earliest pending
    candidate over all detectors."""
    starts = [p for d in PII_DETECTORS if (p := d.pending_start(text)) is not None]
    return min(starts, default=None)


def test_every_detector_is_a_pii_detector_with_a_label() -> None:
    assert {d.scanner for d in PII_DETECTORS} == {"pii"}
    labels = {d.category: d.label for d in PII_DETECTORS}
    assert labels == {
        "pii.email": "[EMAIL]",
        "pii.phone": "[PHONE]",
        "pii.card": "[CARD]",
        "pii.iban": "[IBAN]",
        "pii.national_id": "[NATIONAL_ID]",
        "pii.ip": "[IP]",
    }


# --- email --------------------------------------------------------------------------------


@pytest.mark.parametrize("email", [
    "john.doe@example.com",
    "jane+tag@mail.example.co.uk",
    "a.b-c_d@sub-domain.example.org",
    "X9@EXAMPLE.IO",
])  # fmt: skip
def test_email_is_found_whole(email: str) -> None:
    assert find(f"write to {email}.") == [("pii.email", email)]


@pytest.mark.parametrize("text", [
    "@mention in a chat",
    "user@localhost",
    "name@domain.",
    "a @ b.com",
    "decorators like @dataclass(frozen=True)",
])  # fmt: skip
def test_not_an_email(text: str) -> None:
    assert "pii.email" not in categories(text)


# --- phone --------------------------------------------------------------------------------


@pytest.mark.parametrize("phone", [
    "+1 (555) 123-4567",
    "+1-555-123-4567",
    "+44 20 7946 0958",
    "+44 (0)20 7946 0958",
    "+49 30 1234567",
    "+49 (30) 1234567",
    "+4930123456",
    "+33 6 12 34 56 78",
    "+41 44 668 18 00",
    "(555) 123-4567",
    "(555)123-4567",
    "555-123-4567",
    "555.123.4567",
    "1-800-555-0199",
    "020 7946 0958",
    "0161 496 0000",
    "07700 900123",
    "030 1234567",
    "030/1234567",
    "0171-1234567",
    "06 12 34 56 78",
    "06.12.34.56.78",
])  # fmt: skip
def test_phone_is_found_whole(phone: str) -> None:
    assert find(f"call {phone} today") == [("pii.phone", phone)]


@pytest.mark.parametrize("text", [
    "In 2024 we sold 1,234,567 units",
    "It costs $1,299.99 or 12.345,67 EUR",
    "growth of +5%, +1.5% or +100 points",
    "+12.345.678 users",
    "order 20240115 shipped",
    "invoice 202401151230",
    "build 12345678901",
    "timestamp 1705312800000",
    "version 1.2.3 and 10.0.19041",
    "date 2024-01-15, 01.02.2024, 05/10/2024 10:30, 15.01.24",
    "ISBN 978-3-16-148410-0",
    "zip 90210-1234",
    "rooms 101 202 303 404",
    "counting 1 2 3 4 5 6 7 8 9 10 11 12",
    "zeros 00 11 22 33 44 and 0000 0000 0000",
    "pi is 3.141592653589793",
    "Call 911",
    "Tel 12345678",
])  # fmt: skip
def test_plain_numbers_are_not_phones(text: str) -> None:
    assert "pii.phone" not in categories(text)


# --- payment cards ------------------------------------------------------------------------


@pytest.mark.parametrize("card", [
    "4111 1111 1111 1111",  # Visa
    "4111-1111-1111-1111",
    "4111111111111111",
    "4222222222222",  # Visa, 13 digits
    "5555 5555 5555 4444",  # Mastercard
    "6011111111111117",  # Discover
    "378282246310005",  # Amex
    "3782 822463 10005",  # Amex as printed
    "3056 930902 5904",  # Diners, 14 digits
    "6304000000000000018",  # 19 digits
])  # fmt: skip
def test_luhn_valid_card_is_found(card: str) -> None:
    assert find(f"card {card}, exp 12/26") == [("pii.card", card)]


@pytest.mark.parametrize("text", [
    "4111 1111 1111 1112",  # fails Luhn
    "4111111111111112",
    "1234 5678 9012 3456",
    "0000 0000 0000 0000",  # passes Luhn but no card starts with 0
    "41111111111111110000000",  # a 23-digit id: no card inside it
    "1234 4111 1111 1111 1111",  # a fifth group before: a longer number
    "4111 1111 1111 1111 2222",  # a fifth group after
    "411111111111",  # 12 digits
    "ref4111111111111111",  # glued to a word
])  # fmt: skip
def test_not_a_card(text: str) -> None:
    assert "pii.card" not in categories(text)


def test_card_followed_by_cvv_is_still_found() -> None:
    assert find("4111 1111 1111 1111 123") == [("pii.card", "4111 1111 1111 1111")]


def test_luhn() -> None:
    assert is_luhn_valid("79927398713")
    assert not is_luhn_valid("79927398710")
    assert not is_luhn_valid("")
    assert is_card_number("4111-1111-1111-1111")
    assert not is_card_number("4111 1111 1111 1112")
    assert not is_card_number("79927398713")  # Luhn-valid but only 11 digits


# --- IBAN ---------------------------------------------------------------------------------


@pytest.mark.parametrize("iban", [
    "DE89 3704 0044 0532 0130 00",
    "DE89370400440532013000",
    "GB82 WEST 1234 5698 7654 32",
    "NL91 ABNA 0417 1643 00",
    "FR14 2004 1010 0505 0001 3M02 606",
    "IT60 X054 2811 1010 0000 0123 456",
    "ES91 2100 0418 4502 0005 1332",
    "BE68 5390 0754 7034",
    "AT61 1904 3002 3457 3201",
    "CH93 0076 2011 6238 5295 7",
    "NO93 8601 1117 947",
    "PL61 1090 1014 0000 0712 1981 2874",
])  # fmt: skip
def test_valid_iban_is_found(iban: str) -> None:
    assert is_iban_valid(iban)
    assert find(f"IBAN: {iban}.") == [("pii.iban", iban)]


@pytest.mark.parametrize("iban", [
    "DE88 3704 0044 0532 0130 00",  # wrong check digits
    "DE89 3704 0044 0532 0130 01",  # a changed BBAN digit
    "GB82 WEST 1234 5698 7654 33",
    "DE89 3704 0044 0532 0130 0",  # one character short for DE
    "NL91 ABNA 0417 1643 0000",  # too long for NL
    "XX89 3704 0044 0532 0130 00",  # no such country
])  # fmt: skip
def test_invalid_iban_is_not_found(iban: str) -> None:
    assert not is_iban_valid(iban)
    assert "pii.iban" not in categories(f"IBAN: {iban}.")


def test_iban_lengths_cover_sepa_and_gb() -> None:
    sepa = {"AD", "AT", "BE", "BG", "CH", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR",
            "GB", "GI", "GR", "HR", "HU", "IE", "IS", "IT", "LI", "LT", "LU", "LV", "MC",
            "MT", "NL", "NO", "PL", "PT", "RO", "SE", "SI", "SK", "SM", "VA"}
    assert sepa <= IBAN_LENGTHS.keys()
    assert all(15 <= n <= 34 for n in IBAN_LENGTHS.values())


def test_iban_digits_are_not_also_a_card_or_phone() -> None:
    assert categories("DE89 3704 0044 0532 0130 00") == {"pii.iban"}


# --- national ids -------------------------------------------------------------------------


@pytest.mark.parametrize("national_id", [
    "123-45-6789",  # SSN
    "665-01-0001",
    "AB 12 34 56 C",  # UK NINO
    "JG103759A",
    "12345678Z",  # Spanish DNI
    "12345678-Z",
    "X1234567L",  # Spanish NIE
    "Y1234567X",
])  # fmt: skip
def test_national_id_is_found(national_id: str) -> None:
    assert find(f"id {national_id} on file") == [("pii.national_id", national_id)]


@pytest.mark.parametrize("text", [
    "000-12-3456",  # SSN area 000
    "666-12-3456",  # area 666
    "900-12-3456",  # areas 900-999
    "987-65-4321",
    "123-00-4567",  # group 00
    "123-45-0000",  # serial 0000
    "123456789",  # no dashes: just a number
    "QQ123456C",  # NINO: Q is never a first letter
    "AO123456A",  # O is never a second letter
    "BG123456A",  # unallocated prefixes
    "GB123456A",
    "ZZ123456A",
    "AB123456E",  # suffix is A-D
    "12345678A",  # DNI with the wrong letter
    "X1234567A",  # NIE with the wrong letter
])  # fmt: skip
def test_not_a_national_id(text: str) -> None:
    assert "pii.national_id" not in categories(f"id {text} on file")


def test_spanish_id_letter() -> None:
    assert is_spanish_id_valid("12345678Z")
    assert is_spanish_id_valid("z1234567r")  # case does not matter
    assert not is_spanish_id_valid("12345678")
    assert not is_spanish_id_valid("A1234567L")


# --- IP addresses -------------------------------------------------------------------------


@pytest.mark.parametrize("ip", [
    "192.168.1.1",
    "10.0.0.255",
    "255.255.255.255",
    "0.0.0.0",
    "2001:db8::1",
    "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
    "fe80::1",
    "::1",
])  # fmt: skip
def test_ip_is_found(ip: str) -> None:
    assert find(f"from {ip}.") == [("pii.ip", ip)]


def test_ipv4_mapped_ipv6_is_found_whole() -> None:
    assert ("pii.ip", "::ffff:192.0.2.128") in find("from ::ffff:192.0.2.128 today")


@pytest.mark.parametrize("text", [
    "256.1.1.1",
    "1.2.3.999",
    "version 1.2.3",
    "v1.2.3.4",
    "version 1.2.3.4",
    "Version: 10.0.0.1",
    "1.2.3.4.5",
    "192.168.01.1",  # leading zeros are not written in addresses
    "prices 1.99, 2.50",
    "at 12:30:45",
    "ratio 16:9",
    "dead::beef",  # hex words, not an address
    "std::vector<int>",
    "2001:db8::1::2",  # two "::" is not IPv6
])  # fmt: skip
def test_not_an_ip(text: str) -> None:
    assert "pii.ip" not in categories(text)


# --- redact -------------------------------------------------------------------------------


def test_redact_reads_naturally() -> None:
    text = "mail john.doe@example.com or call +1 (555) 123-4567."
    assert redact(text, [s for d in PII_DETECTORS for s in d.find(text)]) == (
        "mail [EMAIL] or call [PHONE].")


def test_redact_mixed_text() -> None:
    text = ("Pay 4111 1111 1111 1111 or wire to DE89 3704 0044 0532 0130 00; "
            "SSN 123-45-6789, server 10.0.0.1, released in 2024 as v1.2.3.")
    spans = [s for d in PII_DETECTORS for s in d.find(text)]
    assert redact(text, spans) == (
        "Pay [CARD] or wire to [IBAN]; SSN [NATIONAL_ID], server [IP], "
        "released in 2024 as v1.2.3.")


def test_redact_keeps_earliest_then_longest_of_overlapping_spans() -> None:
    text = "0123456789"
    spans = [
        Span(4, 6, "b", "t", label="[B]"),
        Span(2, 5, "a", "t", label="[A]"),  # starts first: wins over b
        Span(2, 4, "short", "t", label="[S]"),  # same start, shorter: loses to a
        Span(7, 9, "c", "t", label="[C]"),
    ]
    assert redact(text, spans) == "01[A]56[C]9"


def test_redact_edge_cases() -> None:
    assert redact("abc", []) == "abc"
    assert redact("abc", [Span(0, 3, "x", "t")]) == "[REDACTED]"
    assert redact("abc", [Span(1, 1, "x", "t", label="[E]")]) == "abc"  # empty span
    assert redact("ab", [Span(0, 1, "x", "t", label="[X]"), Span(1, 2, "y", "t",
                                                                 label="[Y]")]) == "[X][Y]"


# --- streaming ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("mail me at john.doe@exa", "john.doe@exa"),
    ("mail me at john.doe@example.com", "john.doe@example.com"),  # could still be .co.uk
    ("card 4111 1111 11", "4111 1111 11"),
    ("card 41111111", "41111111"),
    ("IBAN DE89 3704 00", "DE89 3704 00"),
    ("IBAN GB82 WE", "GB82 WE"),
    ("call +49 30 12", "+49 30 12"),
    ("call (555) 12", "(555) 12"),
    ("call 555-123-", "555-123-"),
    ("call 020 79", "020 79"),
    ("call 06 12 34", "06 12 34"),
    ("SSN 123-45-", "123-45-"),
    ("host 192.168.", "192.168."),
    ("host 2001:db8:", "2001:db8:"),
])  # fmt: skip
def test_pending_start_is_where_the_truncated_value_starts(text: str, value: str) -> None:
    assert pending_start(text) == len(text) - len(value)


@pytest.mark.parametrize("value", [
    "john.doe@example.com",
    "+1 (555) 123-4567",
    "+44 (0)20 7946 0958",
    "+33 6 12 34 56 78",
    "555-123-4567",
    "020 7946 0958",
    "0161 496 0000",
    "030/1234567",
    "06 12 34 56 78",
    "4111 1111 1111 1111",
    "3782 822463 10005",
    "DE89 3704 0044 0532 0130 00",
    "GB82 WEST 1234 5698 7654 32",
    "123-45-6789",
    "AB 12 34 56 C",
    "X1234567L",
    "192.168.1.1",
    "2001:db8::1",
])  # fmt: skip
def test_every_truncation_of_a_value_is_held_back_whole(value: str) -> None:
    # The regex module prefers a complete match to a partial one: "+44 (0)20 " completes
    # as the too-short "+44 (0)20", which would release the start of the number unless
    # the pattern keeps the whole candidate pending.
    lead = "Here it is: "
    held = {value[:i]: pending_start(lead + value[:i]) for i in range(1, len(value))}
    assert {prefix: start for prefix, start in held.items() if start != len(lead)} == {}


def test_a_trailing_full_stop_is_not_taken_into_the_span() -> None:
    assert find("call 020 7946 0958.") == [("pii.phone", "020 7946 0958")]
    assert find("call +44 20 7946 0958.") == [("pii.phone", "+44 20 7946 0958")]


@pytest.mark.parametrize("text", [
    "Hello, how are you today?",
    "That is all (for now).",
    "Done!",
    "See: (a), [b], {c}!",
])  # fmt: skip
def test_pending_start_on_prose_holds_nothing(text: str) -> None:
    assert pending_start(text) is None


@pytest.mark.parametrize("text", [
    "That is fine.",  # "fine." may still become fine.x@example.com
    "The year was 2024",
    "see the cafe",
    "I think so",
])  # fmt: skip
def test_pending_start_on_prose_holds_at_most_the_last_word(text: str) -> None:
    start = pending_start(text)
    assert start is None or " " not in text[start:]


# --- speed --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "1 " * 10_000,
    "1234 " * 4_000,
    "1" * 20_000,
    "0" * 20_000,
    " " * 20_000,
    "1.2.3." * 3_334,
    "a1:" * 6_667,
    "+1 " * 6_667,
    "a" * 20_000,
    "AB12 " * 4_000,
    "1-2-" * 5_000,
])  # fmt: skip
def test_adversarial_input_scans_in_linear_time(text: str) -> None:
    assert len(text) >= 20_000
    assert best_of_three(lambda: [d.find(text) for d in PII_DETECTORS]) < 0.05
    assert best_of_three(lambda: [d.pending_start(text) for d in PII_DETECTORS]) < 0.05

