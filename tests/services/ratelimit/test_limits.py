"""The limits file: parsing, validation, which limit each descriptor matches, reloads."""

from __future__ import annotations

import logging
import os
import textwrap
from pathlib import Path

import pytest

from services.ratelimit.limits import LimitsFile, RateLimit, Unit, parse_limits

LIMITS = textwrap.dedent("""\
    domain: genmesh
    descriptors:
      - key: tenant
        rate_limit: {unit: minute, requests_per_unit: 60}
      - key: tenant
        value: alice
        rate_limit: {unit: MINUTE, requests_per_unit: 600}
        descriptors:
          - key: path
            value: /v1/generate
            rate_limit: {unit: second, requests_per_unit: 5}
          - key: path
            descriptors:
              - key: model
                rate_limit: {unit: hour, requests_per_unit: 1000}
      - key: tenant
        value: internal
      - key: remote_address
        value: 10.0.0.1
        rate_limit: {unit: day, requests_per_unit: 3}
      - key: status
        value: 429
        rate_limit: {unit: day, requests_per_unit: 1}
    """)


def limit(entries: list[tuple[str, str]]) -> RateLimit | None:
    return parse_limits(LIMITS).find(entries)


def test_parses_the_example():
    limits = parse_limits(LIMITS)
    assert limits.domain == "genmesh"
    assert limits.num_limits == 6
    assert limit([("tenant", "alice")]) == RateLimit(600, Unit.MINUTE, "tenant=alice")


@pytest.mark.parametrize(("entries", "expected"), [
    # A valueless item matches any value; the counter is per value (see test_counters).
    ([("tenant", "bob")], RateLimit(60, Unit.MINUTE, "tenant")),
    ([("tenant", "carol")], RateLimit(60, Unit.MINUTE, "tenant")),
    # The valued item wins over the valueless one.
    ([("tenant", "alice")], RateLimit(600, Unit.MINUTE, "tenant=alice")),
    ([("tenant", "alice"), ("path", "/v1/generate")],
     RateLimit(5, Unit.SECOND, "tenant=alice|path=/v1/generate")),
    # Level 2 without a limit of its own: no limit, not the parent's.
    ([("tenant", "alice"), ("path", "/v1/chat")], None),
    ([("tenant", "alice"), ("path", "/v1/chat"), ("model", "m")],
     RateLimit(1000, Unit.HOUR, "tenant=alice|path|model")),
    # The valued item matched, so its children are the only next level: no fallback to
    # the valueless path item below it (envoyproxy/ratelimit does not backtrack).
    ([("tenant", "alice"), ("path", "/v1/generate"), ("model", "m")], None),
    # An item without rate_limit: never limited, though the valueless item would be.
    ([("tenant", "internal")], None),
    # Longer than the tree, an unknown key, a key in the wrong order: no limit.
    ([("tenant", "bob"), ("path", "/v1/generate")], None),
    ([("user", "bob")], None),
    ([("path", "/v1/generate"), ("tenant", "alice")], None),
    ([("remote_address", "10.0.0.1")], RateLimit(3, Unit.DAY, "remote_address=10.0.0.1")),
    ([("remote_address", "10.0.0.2")], None),
    # A number in YAML is taken as its digits.
    ([("status", "429")], RateLimit(1, Unit.DAY, "status=429")),
])
def test_which_limit_a_descriptor_matches(entries, expected):
    assert limit(entries) == expected


def test_empty_descriptors_mean_no_limits():
    assert parse_limits("domain: genmesh\n").find([("tenant", "a")]) is None
    assert parse_limits("domain: genmesh\ndescriptors: []\n").num_limits == 0


def rate_limited(rate_limit: str, extra: str = "") -> str:
    return f"domain: d\ndescriptors:\n  - key: k\n    rate_limit: {rate_limit}\n{extra}"


@pytest.mark.parametrize(("text", "message"), [
    (rate_limited("{unit: minutes, requests_per_unit: 1}"),
     "descriptors[0].rate_limit.unit: 'minutes' is not one of second, minute, hour, day"),
    (rate_limited("{unit: month, requests_per_unit: 1}"), "'month' is not one of"),
    (rate_limited("{unit: second, requests_per_unit: 0}"),
     "descriptors[0].rate_limit.requests_per_unit: expected a whole number from 1 to "
     "4294967295, got 0"),
    (rate_limited("{unit: second, requests_per_unit: -5}"), "got -5"),
    (rate_limited("{unit: second, requests_per_unit: '5'}"), "got '5'"),
    (rate_limited("{unit: second, requests_per_unit: 1.5}"), "got 1.5"),
    (rate_limited("{unit: second, requests_per_unit: true}"), "got True"),
    (rate_limited("{unit: second, requests_per_unit: 4294967296}"), "got 4294967296"),
    (rate_limited("{unit: second}"), "descriptors[0].rate_limit: missing requests_per_unit"),
    (rate_limited("{unit: second, requests_per_unit: 1, unlimited: true}"),
     "descriptors[0].rate_limit: unknown field unlimited"),
    (rate_limited("{unit: second, requests_per_unit: 1}", "  - key: k\n"),
     "descriptors[1]: duplicate descriptor 'k' at this level"),
    ("domain: d\ndescriptors:\n  - {key: k, value: v}\n  - {key: k, value: w}\n"
     "  - {key: k, value: v}\n", "descriptors[2]: duplicate descriptor 'k=v' at this level"),
    ("domain: d\ndescriptors:\n  - key: a\n    descriptors:\n      - {key: b}\n"
     "      - {key: b}\n", "descriptors[0].descriptors[1]: duplicate descriptor 'b'"),
    ("domain: d\ndescriptors:\n  - key: a\n    key: b\n", "duplicate key 'key'"),
    ("domain: d\ndomain: e\n", "duplicate key 'domain'"),
    ("descriptors: []\n", "the file: missing domain"),
    ("domain: ''\n", "domain: expected a non-empty string, got ''"),
    ("domain: d\ndescriptors: {key: k}\n", "descriptors: expected a list"),
    ("domain: d\ndescriptors:\n  - value: v\n", "descriptors[0]: missing key"),
    ("domain: d\ndescriptors:\n  - key: ''\n", "descriptors[0].key: expected a non-empty"),
    ("domain: d\ndescriptors:\n  - {key: k, value: [1]}\n", "descriptors[0].value"),
    ("domain: d\ndescriptors:\n  - {key: k, rate-limit: {}}\n",
     "descriptors[0]: unknown field rate-limit (expected descriptors, key, rate_limit, value)"),
    ("- just a list\n", "the file: expected a mapping"),
    ("domain: [unclosed\n", "not valid YAML"),
])
def test_rejects_bad_files(text, message):
    with pytest.raises(ValueError) as err:
        parse_limits(text)
    assert message in str(err.value)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def replace(path: Path, text: str) -> None:
    """Writes a new version the way deployments do: a new file renamed over the old."""
    new = path.with_suffix(".new")
    new.write_text(text)
    os.replace(new, path)


def test_reloads_a_renamed_over_file_at_most_once_per_interval(tmp_path):
    path, clock = tmp_path / "limits.yaml", FakeClock()
    path.write_text(rate_limited("{unit: second, requests_per_unit: 1}"))
    limits = LimitsFile(path, check_interval_s=1.0, clock=clock)
    assert limits.current().find([("k", "v")]) == RateLimit(1, Unit.SECOND, "k")

    replace(path, rate_limited("{unit: second, requests_per_unit: 2}"))
    clock.now += 0.5
    assert limits.current().find([("k", "v")]).requests_per_unit == 1  # not looked yet
    clock.now += 0.5
    assert limits.current().find([("k", "v")]).requests_per_unit == 2


def test_a_bad_new_file_is_logged_once_and_the_old_limits_stay(tmp_path, caplog):
    path, clock = tmp_path / "limits.yaml", FakeClock()
    path.write_text(rate_limited("{unit: second, requests_per_unit: 1}"))
    limits = LimitsFile(path, check_interval_s=1.0, clock=clock)
    replace(path, rate_limited("{unit: fortnight, requests_per_unit: 2}"))
    with caplog.at_level(logging.ERROR, logger="genmesh.ratelimit"):
        for _ in range(3):
            clock.now += 1
            assert limits.current().find([("k", "v")]).requests_per_unit == 1
    rejected = [r for r in caplog.records if r.getMessage().startswith("limits file rejected")]
    assert len(rejected) == 1
    assert "'fortnight' is not one of" in rejected[0].error
    assert str(path) in rejected[0].error

    path.unlink()  # missing for a while: the old limits stay
    clock.now += 1
    assert limits.current().find([("k", "v")]).requests_per_unit == 1
    replace(path, rate_limited("{unit: second, requests_per_unit: 3}"))
    clock.now += 1
    assert limits.current().find([("k", "v")]).requests_per_unit == 3


def test_a_bad_file_at_start_is_an_error(tmp_path):
    path = tmp_path / "limits.yaml"
    with pytest.raises(FileNotFoundError):
        LimitsFile(path)
    path.write_text("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: year}\n")
    with pytest.raises(ValueError, match=r"limits\.yaml: descriptors\[0\]\.rate_limit: missing"):
        LimitsFile(path)
