"""A prefilter for the prompt-injection rules: one pass of Hyperscan (a multi-pattern
regex engine; the ``hyperscan`` package) over a view names the few rules that may match
it, and only those run (``injection.hits``'s ``candidates``). Of ~74 rules, ~30 hold their
anchor words in a typical 2,000-character view and are tried there one by one; ~4 pass
the prefilter, which costs ~0.04 ms a view.

The hits are the same as without it:

- each rule is compiled in Hyperscan's prefilter mode, which matches a superset of what
  the pattern matches (lookarounds and what else it lacks are widened, never narrowed);
  its word boundaries are dropped and its bounded repeats made unbounded (``{0,3}`` is
  ``*``: a superset again, and a far smaller automaton);
- Hyperscan reads bytes, with ASCII classes: each character of a view beyond printable
  ASCII is scanned as one byte that stands for the classes the rules use that hold it
  (letter, number, word character, whitespace, digit: ``scanned_bytes``), and each class
  of a rule's expression lists the bytes of the characters it holds (``expression``), so
  a class matches a character's byte wherever it matches the character;
- ``expression`` reads a strict subset of the ``regex`` syntax; a rule with anything
  else (another flag, group, Unicode property or escape, a negated class holding a
  character beyond ASCII, a range with an end that is not a plain character), or one
  Hyperscan cannot compile, always runs. ``tests/.../test_prefilter.py`` checks the hits
  are equal on the labelled sets, and each construct.

Compiling takes seconds on two cores, so the database is cached on disk, keyed by the
rules' sources and the engine's version (as the classifier is), and built in a background
thread when missing (the compiler lets go of the GIL): until it is ready every rule runs.
A database built for another CPU (an image built elsewhere) is refused when loaded, and
built again the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import regex

from services.safety import injection
from services.safety.cache_files import keep_newest

log = logging.getLogger("genmesh.safety")

try:
    import hyperscan
except ImportError:  # no wheel for this platform: every rule runs, as before
    hyperscan = None  # type: ignore[assignment]

_FORMAT = 3
_MAX_CACHED = 4  # databases (rule versions) kept in the cache folder

# Each character a view may hold beyond printable ASCII, "\n" and "\t" stands, in the
# bytes Hyperscan scans, for one byte that says which of the classes the rules use hold
# it: a letter (``\p{L}``), a number (``\p{N}``), a word character (``\w``), whitespace
# (``\s``), a digit (``\d``), as the ``regex`` module judges them. An expression lists,
# wherever a rule's class holds such characters, the bytes of those that belong.
_LETTER, _NUMBER, _WORD, _SPACE, _DIGIT = 1, 2, 4, 8, 16
_CLASS_OF = {bit: regex.compile(source, regex.V1) for bit, source in (  # as the rules' are
    (_LETTER, r"\p{L}"), (_NUMBER, r"\p{N}"), (_WORD, r"\w"), (_SPACE, r"\s"), (_DIGIT, r"\d"))}
_FIRST_BYTE, _NUM_BYTES = 0x80, 32  # + the class bits: 0x80-0x9f


def _class_byte(c: str) -> str:
    bits = sum(bit for bit, pattern in _CLASS_OF.items() if pattern.match(c))
    return chr(_FIRST_BYTE + bits)


def _bytes_in(bit: int) -> str:
    """The stand-in bytes (as escapes) of the characters in the class of ``bit``."""
    return "".join(f"\\x{b:02x}" for b in range(_FIRST_BYTE, _FIRST_BYTE + _NUM_BYTES)
                   if (b - _FIRST_BYTE) & bit)


def _byte_escape(c: str) -> str:
    return f"\\x{ord(_class_byte(c)):02x}"


_IN_CLASS = {r"\p{L}": "a-zA-Z" + _bytes_in(_LETTER), r"\p{N}": "0-9" + _bytes_in(_NUMBER),
             r"\w": r"\w" + _bytes_in(_WORD), r"\s": r"\s" + _bytes_in(_SPACE),
             r"\d": r"\d" + _bytes_in(_DIGIT)}
_OUTSIDE = {**{k: f"[{v}]" for k, v in _IN_CLASS.items()},
            **{negated.upper(): f"[^{_IN_CLASS[negated]}]" for negated in (r"\w", r"\s", r"\d")},
            # Word boundaries dropped (a superset again), as an empty group: a repeat
            # after one ("\b{2}") stays on nothing, not on what came before.
            r"\b": "(?:)", r"\B": "(?:)"}
# Escapes read as they are (in a class or out): a literal ASCII character that is neither
# a letter nor a digit ("\.", "\[", "\-"), and the two control characters scanned as
# they are. Another escape ("\r", "\x1c", "\u2014", "\1") makes the rule always run.
_KEPT_ESCAPE = regex.compile(r"\\(?:[\x21-\x2f\x3a-\x40\x5b-\x60\x7b-\x7e ]|[nt])")
# The groups read: a plain one and the lookarounds (Hyperscan's prefilter mode widens
# those). Any other "(?" (an inline flag, an atomic or named group) makes the rule run.
_GROUPS = ("(?:", "(?=", "(?!", "(?<=", "(?<!")
_REPEAT = regex.compile(r"\{([0-9]+)(,([0-9]*))?\}")  # ASCII digits: "{٣}" is literal text
_PLAIN = regex.compile(r"[\x20-\x7e\n\t]")  # a character scanned as it is
_PASSED = regex.compile(r"[\x20-\x7e\n\t]*")
# The flags every rule is compiled with: a rule with others (IGNORECASE, DOTALL,
# VERBOSE...) would mean something its source alone does not say.
_RULE_FLAGS = regex.compile("", regex.V1).flags


class _ByteTable(dict[int, str]):
    """``str.translate``'s table for ``scanned_bytes``: a character beyond the plain ones
    is looked up once (the first 65,536 kept)."""

    def __missing__(self, code: int) -> str:
        byte = _class_byte(chr(code))
        if len(self) < 65_536:
            self[code] = byte
        return byte


_BYTES = _ByteTable({c: chr(c) for c in (*range(0x20, 0x7F), 0x0A, 0x09)})


def scanned_bytes(view: str) -> bytes:
    """``view`` as Hyperscan scans it: each character beyond printable ASCII, "\\n" and
    "\\t" as its class's byte."""
    if _PASSED.fullmatch(view):
        return view.encode()
    return view.translate(_BYTES).encode("latin-1")


def _escape_at(pattern: str, i: int) -> str:
    return pattern[i:i + 5] if pattern[i + 1:i + 2] in ("p", "P") else pattern[i:i + 2]


def _class(pattern: str, i: int) -> tuple[str, int] | None:
    """The class that opens at ``pattern[i]`` ("[") for Hyperscan, and the index past
    it; None when it holds what ``expression`` does not read."""
    j = i + 1
    negated = pattern.startswith("^", j)
    j += negated
    items: list[tuple[str, str]] = []  # (kind, Hyperscan source): "plain" a character
    while True:
        if j >= len(pattern):
            return None
        c = pattern[j]
        if c == "]" and items:
            break
        if c == "[" or (c in "-&|~" and pattern[j + 1:j + 2] == c):
            return None  # a POSIX class, a nested set, a set operation (regex V1)
        if c == "\\":
            escape = _escape_at(pattern, j)
            if escape in _IN_CLASS:
                items.append(("set", _IN_CLASS[escape]))
            elif not escape[1:2].isascii() and not negated:
                items.append(("set", _byte_escape(escape[1])))
            elif _KEPT_ESCAPE.fullmatch(escape):
                items.append(("escape", escape))
            else:
                return None
            j += len(escape)
            continue
        if not c.isascii() and not negated:
            # Its byte stands for every character of its classes: a superset in a class,
            # but not in a negated one (it would leave all those out).
            items.append(("set", _byte_escape(c)))
        elif _PLAIN.fullmatch(c):
            items.append(("plain" if c not in "\n\t" else "control", c))
        else:
            return None
        j += 1
    # A "-" between two items is a range: both ends plain printable characters.
    for k, (kind, text) in enumerate(items):
        is_range = kind == "plain" and text == "-" and 0 < k < len(items) - 1
        if is_range and {items[k - 1][0], items[k + 1][0]} != {"plain"}:
            return None
    return f"[{'^' if negated else ''}{''.join(text for _, text in items)}]", j + 1


def expression(pattern: str, flags: int = _RULE_FLAGS) -> str | None:
    """``pattern`` (compiled by the rules with ``flags``) for Hyperscan over
    ``scanned_bytes``: it matches wherever ``pattern`` matches the view. Its classes hold
    the stand-in bytes of their characters, a character beyond ASCII is its class's byte,
    word boundaries are dropped and bounded repeats are unbounded (``{0,n}`` is ``*``,
    ``{m,n}`` is ``{m,}``; lazy or not). None when it holds anything else than what this
    reads: another Unicode property, a negated class with a character beyond ASCII,
    a range with an end that is not a plain character, other flags, groups or escapes,
    a control character but "\\n" and "\\t"."""
    if flags != _RULE_FLAGS:
        return None
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "[":
            translated = _class(pattern, i)
            if translated is None:
                return None
            out.append(translated[0])
            i = translated[1]
            continue
        if c == "\\":
            escape = _escape_at(pattern, i)
            if escape in _OUTSIDE:
                out.append(_OUTSIDE[escape])
            elif not escape[1:2].isascii():
                out.append(_byte_escape(escape[1]))
            elif _KEPT_ESCAPE.fullmatch(escape):
                out.append(escape)
            else:
                return None
            i += len(escape)
            continue
        if c == "(" and pattern.startswith("(?", i) and not pattern.startswith(_GROUPS, i):
            return None
        if c == "{":
            repeat = _REPEAT.match(pattern, i)
            if repeat is None:
                return None  # "{,n}", a fuzzy match "{e<=1}"
            low, comma, high = repeat.groups()
            out.append(repeat.group() if not comma or not high
                       else "*" if low == "0" else f"{{{low},}}")
            i = repeat.end()
            continue
        if not c.isascii():
            out.append(_byte_escape(c))
        elif _PLAIN.fullmatch(c):
            out.append(c)
        else:
            return None
        i += 1
    return "".join(out)


def _expressions(rules: Sequence[injection.Rule]) -> dict[int, str]:
    """Each rule's Hyperscan expression by its index in ``rules`` (the ones that have one)."""
    out = {}
    for index, rule in enumerate(rules):
        source = expression(rule.pattern.pattern, rule.pattern.flags)
        if source is not None:
            out[index] = source
    return out


def _flags() -> int:
    assert hyperscan is not None
    return int(hyperscan.HS_FLAG_PREFILTER | hyperscan.HS_FLAG_SINGLEMATCH)


def database_key(rules: Sequence[injection.Rule]) -> str:
    """A hash of what determines the compiled database: the rules' patterns (all of
    them, in order: the ones that always run are stored by index), their expressions,
    the engine."""
    h = hashlib.sha256(f"{_FORMAT}|{getattr(hyperscan, '__version__', '')}".encode())
    for rule in rules:
        source = expression(rule.pattern.pattern, rule.pattern.flags)
        h.update(f"{rule.pattern.pattern}\0{rule.pattern.flags}\0{source}\0".encode())
    return h.hexdigest()


def _compile(expressions: dict[int, str]) -> Any:
    assert hyperscan is not None
    db = hyperscan.Database()
    ids = sorted(expressions)
    db.compile(expressions=[expressions[i].encode() for i in ids], ids=ids,
               elements=len(ids), flags=[_flags()] * len(ids))
    return db


def build(rules: Sequence[injection.Rule]) -> tuple[Any, frozenset[int]]:
    """The compiled database of ``rules``' expressions (None when none has one), and the
    indices of the rules that are always candidates (no expression, or one Hyperscan
    cannot compile)."""
    expressions = _expressions(rules)
    if not expressions:  # nothing to filter with: every rule runs
        return None, frozenset(range(len(rules)))
    try:
        db = _compile(expressions)
    except hyperscan.error:
        for index in list(expressions):  # find the ones it cannot compile
            try:
                _compile({index: expressions[index]})
            except hyperscan.error:
                del expressions[index]
        db = _compile(expressions) if expressions else None
    return db, frozenset(range(len(rules))) - frozenset(expressions)


def database_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"injection-prefilter-{key[:16]}.hsdb"


def _save(path: Path, db: Any, always: frozenset[int]) -> None:
    assert hyperscan is not None
    if db is None:
        return
    header = json.dumps({"always": sorted(always)}).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(header + b"\n" + hyperscan.dumpb(db))
    tmp.replace(path)
    keep_newest(path.parent, "injection-prefilter-*.hsdb", _MAX_CACHED)  # ~3-4 MB each


def _load(path: Path) -> tuple[Any, frozenset[int]] | None:
    assert hyperscan is not None
    try:
        header, blob = path.read_bytes().split(b"\n", 1)
        always = frozenset(int(i) for i in json.loads(header)["always"])
        return hyperscan.loadb(blob, hyperscan.HS_MODE_BLOCK), always
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, hyperscan.error) as exc:
        log.warning("cannot read the rule prefilter; rebuilding",
                    extra={"path": str(path), "error": repr(exc)})
        return None


class RulePrefilter:
    """``candidates`` for ``injection.hits``: None (every rule) until a database is
    installed."""

    def __init__(self) -> None:
        self._db: Any = None
        self._always: frozenset[int] = frozenset()
        self._local = threading.local()  # a scratch space per thread (Hyperscan's rule)
        self.ready = threading.Event()

    def install(self, db: Any, always: frozenset[int]) -> None:
        self._always = always
        self._db = db
        self.ready.set()

    def candidates(self, view: str) -> frozenset[int] | set[int] | None:
        """The indices of the rules that may match ``view``; None: every rule (no
        database yet)."""
        db = self._db
        if db is None:
            return None
        found = set(self._always)

        def on_match(index: int, start: int, end: int, flags: int, context: Any) -> None:
            found.add(index)

        try:
            scratch = getattr(self._local, "scratch", None)
            if scratch is None or self._local.db is not db:
                scratch = self._local.scratch = hyperscan.Scratch(db)
                self._local.db = db
            db.scan(scanned_bytes(view), match_event_handler=on_match, scratch=scratch)
        except hyperscan.error:  # every rule runs: the same hits, as before
            log.exception("the rule prefilter failed on a view")
            return None
        return found


def load_or_build(cache_dir: Path, *, wait: bool,
                  rules: Sequence[injection.Rule] | None = None) -> RulePrefilter:
    """The prefilter of ``rules`` (``injection.RULES``), from the database cached under
    ``cache_dir`` or built into it: at once when ``wait``, else in a background thread
    (meanwhile every rule runs). Without Hyperscan, one that never gets a database."""
    rules = injection.RULES if rules is None else rules
    prefilter = RulePrefilter()
    if hyperscan is None:
        log.warning("hyperscan is not installed: the injection rules run without a prefilter")
        return prefilter
    path = database_path(cache_dir, database_key(rules))
    loaded = _load(path)
    if loaded is not None:
        prefilter.install(*loaded)
        return prefilter

    def build_and_save() -> None:
        try:
            db, always = build(rules)
            try:
                _save(path, db, always)
            except OSError as exc:  # a read-only cache: it serves, and builds again
                log.warning("cannot cache the rule prefilter",
                            extra={"path": str(path), "error": repr(exc)})
            prefilter.install(db, always)
        except Exception:  # it stays off: every rule runs, as without it
            log.exception("cannot build the rule prefilter")

    if wait:
        build_and_save()
    else:
        threading.Thread(target=build_and_save, name="rule-prefilter", daemon=True).start()
    return prefilter
