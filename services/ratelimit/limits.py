"""The limits file: which limit applies to a request descriptor.

The format is a subset of envoyproxy/ratelimit's configuration::

    domain: genmesh
    descriptors:
      - key: tenant                 # any tenant: each value gets its own counter
        rate_limit: {unit: minute, requests_per_unit: 60}
      - key: tenant
        value: alice                # alice only: wins over the valueless entry
        rate_limit: {unit: minute, requests_per_unit: 600}
        descriptors:                # the next level: [tenant=alice, path=...]
          - key: path
            value: /v1/generate
            rate_limit: {unit: second, requests_per_unit: 5}
      - key: tenant
        value: internal             # no rate_limit: never limited

A request descriptor's entries are matched level by level: entry i against the
``descriptors`` of the item entry i-1 matched, preferring the item whose value equals
the entry's value over the item without a value (which matches any value). The limit is
the ``rate_limit`` of the item the last entry matched; a descriptor that stops matching
at some level, or ends on an item without ``rate_limit``, has no limit. Counters are per
descriptor (all its keys and values), so a valueless item counts each value apart.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("genmesh.ratelimit")

MAX_REQUESTS_PER_UNIT = 2**32 - 1  # a uint32 in RateLimitResponse.RateLimit


class Unit(enum.Enum):
    """A limit's window; windows are aligned to the Unix epoch."""

    SECOND = 1
    MINUTE = 60
    HOUR = 3600
    DAY = 86400

    @property
    def seconds(self) -> int:
        return self.value


@dataclass(frozen=True, slots=True)
class RateLimit:
    requests_per_unit: int  # hits allowed in one window
    unit: Unit
    # Where the limit is in the limits file, e.g. "tenant=alice|path" (a level with a
    # value shows it); empty for a limit that came with the request.
    name: str = ""


@dataclass(frozen=True, slots=True)
class DescriptorNode:
    """One item of a ``descriptors:`` list."""

    key: str
    value: str | None  # None: matches any value
    limit: RateLimit | None  # None: no limit at this level
    # The next level, by (key, value) with value None for the valueless item.
    children: Mapping[tuple[str, str | None], DescriptorNode] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DomainLimits:
    domain: str
    descriptors: Mapping[tuple[str, str | None], DescriptorNode]

    def find(self, entries: Sequence[tuple[str, str]]) -> RateLimit | None:
        """The limit for a descriptor's (key, value) entries, or None if none applies."""
        level = self.descriptors
        node = None
        for key, value in entries:
            node = level.get((key, value))
            if node is None:
                node = level.get((key, None))
            if node is None:
                return None
            level = node.children
        return None if node is None else node.limit

    @property
    def num_limits(self) -> int:
        def count(level: Mapping[Any, DescriptorNode]) -> int:
            return sum((n.limit is not None) + count(n.children) for n in level.values())
        return count(self.descriptors)


def parse_limits(text: str) -> DomainLimits:
    """The limits in a file's text. ValueError saying where the first mistake is."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from None
    _check_fields(data, "the file", required={"domain"}, optional={"descriptors"})
    domain = data["domain"]
    if not isinstance(domain, str) or not domain:
        raise ValueError(f"domain: expected a non-empty string, got {domain!r}")
    return DomainLimits(domain, _parse_level(data.get("descriptors") or [], "descriptors", ""))


def _parse_level(items: Any, where: str, parent_name: str
                 ) -> dict[tuple[str, str | None], DescriptorNode]:
    if not isinstance(items, list):
        raise ValueError(f"{where}: expected a list, got {items!r}")
    level: dict[tuple[str, str | None], DescriptorNode] = {}
    for n, item in enumerate(items):
        here = f"{where}[{n}]"
        _check_fields(item, here, required={"key"},
                      optional={"value", "rate_limit", "descriptors"})
        key, value = _text(item["key"], f"{here}.key"), item.get("value")
        if value is not None:
            value = _text(value, f"{here}.value")
        if (key, value) in level:
            shown = key if value is None else f"{key}={value}"
            raise ValueError(f"{here}: duplicate descriptor {shown!r} at this level")
        name = (f"{parent_name}|" if parent_name else "") + (
            key if value is None else f"{key}={value}")
        limit = None
        if item.get("rate_limit") is not None:
            limit = _parse_rate_limit(item["rate_limit"], f"{here}.rate_limit", name)
        children = _parse_level(item.get("descriptors") or [], f"{here}.descriptors", name)
        level[key, value] = DescriptorNode(key, value, limit, children)
    return level


def _parse_rate_limit(data: Any, where: str, name: str) -> RateLimit:
    _check_fields(data, where, required={"unit", "requests_per_unit"}, optional=set())
    unit_name = data["unit"]
    units = ", ".join(u.name.lower() for u in Unit)
    if not isinstance(unit_name, str) or unit_name.upper() not in Unit.__members__:
        raise ValueError(f"{where}.unit: {unit_name!r} is not one of {units}")
    count = data["requests_per_unit"]
    if (isinstance(count, bool) or not isinstance(count, int)
            or not 0 < count <= MAX_REQUESTS_PER_UNIT):
        raise ValueError(f"{where}.requests_per_unit: expected a whole number from 1 to "
                         f"{MAX_REQUESTS_PER_UNIT}, got {count!r}")
    return RateLimit(count, Unit[unit_name.upper()], name)


def _check_fields(data: Any, where: str, *, required: set[str], optional: set[str]) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    if missing := sorted(required - data.keys()):
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    if unknown := sorted(map(str, data.keys() - required - optional)):
        raise ValueError(f"{where}: unknown field {', '.join(unknown)} "
                         f"(expected {', '.join(sorted(required | optional))})")


def _text(value: Any, where: str) -> str:
    """A key or value: a non-empty string (a whole number is taken as its digits)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: expected a non-empty string, got {value!r}")
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key twice in one mapping (which YAML would let the
    last one win silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


FileStamp = tuple[int, int, int]  # (inode, mtime in ns, size): changes when replaced
MISSING: FileStamp = (0, 0, -1)  # the stamp of a file that cannot be found


class LimitsFile:
    """The limits of one file, re-read when the file changes: ``current()`` looks at its
    inode and mtime at most once per ``check_interval_s``. A new file that fails to
    parse is logged and the previous limits stay."""

    def __init__(self, path: Path, *, check_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Reads the file now: OSError if it cannot be read, ValueError if it is wrong."""
        self.path = path
        self.check_interval_s = check_interval_s
        self._clock = clock
        self._stamp, self._limits = self._read()
        self._checked_at = clock()
        self._rejected_stamp: FileStamp | None = None  # a bad file already logged

    def current(self) -> DomainLimits:
        now = self._clock()
        if now - self._checked_at >= self.check_interval_s:
            self._checked_at = now
            self._reload_if_changed()
        return self._limits

    def _reload_if_changed(self) -> None:
        try:
            stamp = _stamp(os.stat(self.path))
        except OSError as exc:
            self._reject(MISSING, exc)
            return
        if stamp in (self._stamp, self._rejected_stamp):
            return
        try:
            stamp, limits = self._read()
        except (OSError, ValueError) as exc:
            self._reject(stamp, exc)
            return
        self._stamp, self._limits, self._rejected_stamp = stamp, limits, None
        log.info("limits reloaded", extra={"path": str(self.path), "domain": limits.domain,
                                           "num_limits": limits.num_limits})

    def _reject(self, stamp: FileStamp, exc: Exception) -> None:
        """Keeps the current limits; logs once per bad version of the file."""
        if stamp != self._rejected_stamp:
            self._rejected_stamp = stamp
            log.error("limits file rejected; keeping the previous limits",
                      extra={"path": str(self.path), "error": str(exc)})

    def _read(self) -> tuple[FileStamp, DomainLimits]:
        # Stamp and text from the same open file, so a rename in between is seen later.
        with open(self.path, encoding="utf-8") as f:
            stamp = _stamp(os.fstat(f.fileno()))
            text = f.read()
        try:
            return stamp, parse_limits(text)
        except ValueError as exc:
            raise ValueError(f"{self.path}: {exc}") from None


def _stamp(st: os.stat_result) -> FileStamp:
    return st.st_ino, st.st_mtime_ns, st.st_size
