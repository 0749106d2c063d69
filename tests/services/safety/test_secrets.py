"""Secret detectors: prefixed tokens, JWTs, PEM keys and ``password = ...`` assignments
are found (only the value, for assignments); placeholders, code references and ordinary
words are not; partial tokens at the end of a stream are held; scanning stays linear.

Tokens are assembled from pieces so that this file itself does not look like a leak to
secret scanners (push protection would refuse it)."""

from __future__ import annotations

import pytest

from services.safety.pii import redact
from services.safety.secrets import (
    SECRET_DETECTORS,
    is_placeholder,
    is_unquoted_secret,
    looks_random,
)
from tests.services.safety.conftest import best_of_three

RANDOM_36 = "aB3dE6gH9jK2mN5pQ8sT1vW4yZ7bC0eF3hI6"
RANDOM_40 = "Zx9Qw3Er5Ty7Ui9Op1As3Df5Gh7Jk9Lz1Xc3Vb5N"

AWS_ACCESS_KEY_ID = "AKIA" + "IOSFODNN7EXAMPLE"
AWS_SESSION_KEY_ID = "ASIA" + "Y34FZKBOKMUTVV7A"
GITHUB_TOKENS = [prefix + "_" + RANDOM_36 for prefix in ("ghp", "gho", "ghu", "ghs", "ghr")]
GITHUB_PAT = "github_pat_" + "11ABCDEFG0123456789abc" + "_" + RANDOM_40 + "Qw3Er5Ty7Ui9Op1As3D"
SLACK_TOKEN = "xox" + "b-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
STRIPE_KEY = "sk_" + "live_" + "4eC39HqLyjWDarjtT1zdp7dc"
STRIPE_RESTRICTED_KEY = "rk_" + "live_" + "51H8ab2CdEfGh3IjKlMn4OpQ"
GOOGLE_API_KEY = "AIza" + "SyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q"
OPENAI_KEY = "sk-" + "T3BlbkFJ" + RANDOM_40
OPENAI_PROJECT_KEY = "sk-" + "proj-" + "Ab3dEf6hIj9kLm2nOp5qRs8t_uV1wX4yZ-7"
JWT = ".".join([
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9",
    "eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ",
    "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
])
PEM_KEY = "\n".join([
    "-----BEGIN RSA PRIVATE KEY-----",
    "MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi4bZmvU0PDZm3v+w0o",
    "Dq5bDrqjRyJvwbGVmL6wDZwMqMYhWJDrQ5hx9Id3ks1PQ8d0dKsbZtcS",
    "-----END RSA PRIVATE KEY-----",
])
ENCRYPTED_PEM_KEY = "\n".join([
    "-----BEGIN RSA PRIVATE KEY-----",
    "Proc-Type: 4,ENCRYPTED",
    "DEK-Info: AES-128-CBC,3F17F5316E2BAC89",
    "",
    "MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi4bZmvU0PDZm3v+w0o",
    "-----END RSA PRIVATE KEY-----",
])


def find(text: str) -> list[str]:
    """Matched texts of every secret finding, in text order."""
    spans = sorted((s for d in SECRET_DETECTORS for s in d.find(text)), key=lambda s: s.start)
    return [text[s.start:s.end] for s in spans]


def redacted(text: str) -> str:
    return redact(text, [s for d in SECRET_DETECTORS for s in d.find(text)])


def pending_start(text: str) -> int | None:
    starts = [p for d in SECRET_DETECTORS if (p := d.pending_start(text)) is not None]
    return min(starts, default=None)


def test_every_detector_reports_a_secret() -> None:
    assert {(d.category, d.scanner, d.label) for d in SECRET_DETECTORS} == {
        ("secret", "secrets", "[SECRET]")}


# --- prefixed tokens ----------------------------------------------------------------------


@pytest.mark.parametrize("token", [
    AWS_ACCESS_KEY_ID,
    AWS_SESSION_KEY_ID,
    *GITHUB_TOKENS,
    GITHUB_PAT,
    SLACK_TOKEN,
    STRIPE_KEY,
    STRIPE_RESTRICTED_KEY,
    GOOGLE_API_KEY,
    OPENAI_KEY,
    OPENAI_PROJECT_KEY,
    JWT,
    PEM_KEY,
])  # fmt: skip
def test_token_is_found_whole(token: str) -> None:
    assert find(f"here it is: {token} (do not share)") == [token]
    assert redacted(f"use {token}.") == "use [SECRET]."


@pytest.mark.parametrize("key", [
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----",
    "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEI\n-----END EC PRIVATE KEY-----",
    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----",
    "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIFHz\n-----END ENCRYPTED PRIVATE KEY-----",
])  # fmt: skip
def test_pem_private_key_variants(key: str) -> None:
    assert redacted(f"key:\n{key}\nthanks") == "key:\n[SECRET]\nthanks"
    key = key.replace("\n", "\r\n")
    assert redacted(f"key:\r\n{key}\r\nthanks") == "key:\r\n[SECRET]\r\nthanks"


def test_encrypted_pem_private_key_with_headers() -> None:
    assert redacted(f"key:\n{ENCRYPTED_PEM_KEY}\nthanks") == "key:\n[SECRET]\nthanks"
    truncated = ENCRYPTED_PEM_KEY.split("\n-----END")[0]
    assert redacted(f"{truncated}\n\n(cut off)") == "[SECRET]\n(cut off)"


def test_pem_private_key_without_end_line_is_redacted_up_to_its_body() -> None:
    text = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\nDq5bDrqjRyJv\n(truncated)"
    assert redacted(text) == "[SECRET]\n(truncated)"


@pytest.mark.parametrize("text", [
    "AKIA1234",  # too short
    "AKIA" + "IOSFODNN7EXAMPLEX",  # 17 characters: part of something longer
    "ghp_" + "short",
    "gh_" + RANDOM_36,
    "xox" + "b-placeholder-token-here",  # no digit: documentation, not a token
    "xox" + "q-123456789012-1234567890",  # no such Slack type
    "sk_" + "test_" + "4eC39HqLyjWDarjtT1zdp7dc",  # test mode keys are harmless
    "AIza" + "Sy-too-short",
    "sk-learn-is-a-python-library",  # a slug, not a key
    "sk-" + "short1A",
    "task-" + RANDOM_40,
    "eyJhbGciOiJIUzI1NiJ9",  # a JWT header alone
    "-----BEGIN PUBLIC KEY-----\nMIIBIjANBg\n-----END PUBLIC KEY-----",
    "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl\n-----END CERTIFICATE-----",
    "-----BEGIN PRIVATE KEY-----",  # the armour line alone, mentioned in prose
    "a file that starts with -----BEGIN PRIVATE KEY----- holds a key",
    "-----BEGIN PRIVATE KEY-----\nis the line to look for",
])  # fmt: skip
def test_not_a_token(text: str) -> None:
    assert find(text) == []


def test_aws_secret_key_needs_its_name() -> None:
    assert redacted(f"aws_secret_access_key = {RANDOM_40}") == "aws_secret_access_key = [SECRET]"
    assert redacted(f'AWS_SECRET_ACCESS_KEY="{RANDOM_40}"') == 'AWS_SECRET_ACCESS_KEY="[SECRET]"'
    assert redacted(f'"SecretAccessKey": "{RANDOM_40}"') == '"SecretAccessKey": "[SECRET]"'
    assert find(f"checksum {RANDOM_40}") == []  # 40 base64 characters alone: a hash, an id


# --- assignments --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ('password = "hunter22"', 'password = "[SECRET]"'),
    ("password='correct horse'", "password='[SECRET]'"),
    ("password = \"don't4get\"", 'password = "[SECRET]"'),
    ('"password": "letmein"', '"password": "[SECRET]"'),
    ("passwd: s3cr3t!", "passwd: [SECRET]"),
    ("secret: Tr0ub4dor&3", "secret: [SECRET]"),
    ("api_key=abc123def456", "api_key=[SECRET]"),
    ("API-KEY: 9f8e7d6c5b4a", "API-KEY: [SECRET]"),
    ("DB_PASSWORD=Sup3rS3cret", "DB_PASSWORD=[SECRET]"),
    ("client_secret = 'q8Wz-41xPv'", "client_secret = '[SECRET]'"),
    ("my password: hunter22. Keep it safe.", "my password: [SECRET]. Keep it safe."),
    ("password: CorrectHorse", "password: [SECRET]"),
    ("password = password123", "password = [SECRET]"),
])  # fmt: skip
def test_assigned_value_is_redacted_and_the_name_kept(text: str, expected: str) -> None:
    assert redacted(text) == expected


@pytest.mark.parametrize("text", [
    'password = "<your password>"',
    "password: ********",
    "password: xxxxxxxx",
    "api_key=YOUR_API_KEY",
    "api_key = '<API_KEY>'",
    "api_key: your-api-key-here",
    "password: ${PASSWORD}",
    'password = "${DB_PASSWORD}"',
    "password=%(pw)s",
    "secret: {{ .Values.secret }}",
    'secret = "example-secret-value"',
    'password = "changeme"',
    'password = "<password>"',
    "password = getpass.getpass()",
    "password=os.environ['PW']",
    "password = self.password",
    "api_key: Optional[str] = None",
    "password: string",
    "Password: incorrect",
    "The secret: patience",
    "password = None",
    "if password == 'hunter22':",
    "max_tokens=4096",
    "the passwords are stored hashed",
    "password = short",
])  # fmt: skip
def test_placeholders_code_and_words_are_not_secrets(text: str) -> None:
    assert find(text) == []


def test_validators() -> None:
    assert is_placeholder("********")
    assert is_placeholder("YOUR_API_KEY")
    assert not is_placeholder("hunter22")
    assert is_unquoted_secret("hunter22")
    assert not is_unquoted_secret("incorrect")
    assert not is_unquoted_secret("Incorrect")
    assert looks_random(RANDOM_40)
    assert not looks_random("learn-is-a-python-library")


def test_redact_mixed_text() -> None:
    text = f"export AWS_ACCESS_KEY_ID={AWS_ACCESS_KEY_ID}\nexport DB_PASSWORD=Sup3rS3cret\n"
    assert redacted(text) == "export AWS_ACCESS_KEY_ID=[SECRET]\nexport DB_PASSWORD=[SECRET]\n"


# --- streaming ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("key: AKIAIOSF", "AKIAIOSF"),
    ("token " + GITHUB_TOKENS[0][:12], GITHUB_TOKENS[0][:12]),
    ("use " + OPENAI_KEY[:15], OPENAI_KEY[:15]),
    ("bearer " + JWT[:50], JWT[:50]),
    ("key:\n" + PEM_KEY[:60], PEM_KEY[:60]),  # the whole block is held until END
    ('password = "hunt', "hunt"),
    ("password: hun", "hun"),
])  # fmt: skip
def test_pending_start_is_where_the_truncated_secret_starts(text: str, value: str) -> None:
    assert pending_start(text) == len(text) - len(value)


@pytest.mark.parametrize("value", [
    AWS_ACCESS_KEY_ID,
    GITHUB_TOKENS[0],
    SLACK_TOKEN,
    OPENAI_PROJECT_KEY,
    JWT,
    PEM_KEY,
    PEM_KEY.replace("\n", "\r\n"),
    ENCRYPTED_PEM_KEY,
    ENCRYPTED_PEM_KEY.replace("\n", "\r\n"),
])  # fmt: skip
def test_every_truncation_of_a_secret_is_held_back_whole(value: str) -> None:
    # The regex module prefers a complete match to a partial one: a key block cut after
    # a body line completes as a truncated block, which must still reach the end of the
    # text, or the moderator would release it and then the rest of the key.
    lead = "Here it is:\n"
    held = {value[:i]: pending_start(lead + value[:i]) for i in range(1, len(value))}
    assert {prefix: start for prefix, start in held.items() if start != len(lead)} == {}


@pytest.mark.parametrize("text", [
    "Hello there, how are you?",
    "I asked about it.",
    "Done!",
    "The password policy is strict.",
])  # fmt: skip
def test_pending_start_on_prose_holds_nothing(text: str) -> None:
    assert pending_start(text) is None


# --- speed --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "1 " * 10_000,
    " " * 20_000,
    "a" * 20_000,
    "password=" + "a" * 20_000,
    "password = " * 1_820,
    "eyJ" + "a." * 10_000,
    "-----BEGIN PRIVATE KEY-----" * 741,
    "sk-" * 6_667,
    "ghp_" * 5_000,
])  # fmt: skip
def test_adversarial_input_scans_in_linear_time(text: str) -> None:
    assert len(text) >= 20_000
    assert best_of_three(lambda: [d.find(text) for d in SECRET_DETECTORS]) < 0.05
    assert best_of_three(lambda: [d.pending_start(text) for d in SECRET_DETECTORS]) < 0.05



def test_a_detector_s_context_skips_only_texts_it_cannot_match() -> None:
    # The assignment detectors search their lookbehind's names forward in the case-folded
    # text first: the same spans as without that check, names in any case (the Kelvin
    # sign and the long s fold to k and s, as the lookbehind's case-insensitive names
    # match them), any assignment, anywhere in the text.
    import dataclasses
    import random

    from services.safety.secrets import SECRET_DETECTORS

    rng = random.Random(0)
    names = ["password", "passwd", "client_secret", "secret-key", "secret_access_key",
             "api_key", "apikey", "access_token", "auth-token", "private_key",
             "aws_secret_access_key", "awssecretkey", "my_password", "keyring"]
    assigns = ["=", ": ", " = ", "\t:\t", '"="', "':'", "==", "  =  ", " is "]
    values = ["hunter22!", "'s3cr3tValue9'", '"Abcdef12345"', "`token_value_99`",
              "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "x"]

    def spelled(name: str) -> str:
        swaps = {"k": "\u212a", "s": "\u017f"}
        return "".join(swaps[c] if c in swaps and rng.random() < 0.15 else
                       c.upper() if rng.random() < 0.4 else c for c in name)

    prose = "The keys are on the table; pass the secret sauce, and guard the token. "
    texts = [prose * 3]
    for _ in range(400):
        i = rng.randrange(len(prose))
        texts.append(prose[:i] + " " + spelled(rng.choice(names)) + rng.choice(assigns)
                     + rng.choice(values) + " " + prose[i:])
    with_context = [d for d in SECRET_DETECTORS if d.context is not None]
    assert len(with_context) == 3
    found = 0
    for d in with_context:
        plain = dataclasses.replace(d, context=None)
        for text in texts:
            assert d.find(text) == plain.find(text), text
            assert d.find(text, 40) == plain.find(text, 40), text
            found += len(plain.find(text))
    assert found > 100
