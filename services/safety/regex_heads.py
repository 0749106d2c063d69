"""Where a pattern's matches can start, from its source, so that a long text is matched
only there instead of searched.

``head_words`` reads the literal first words of a pattern "\\b(?:a|b|...)..." (the
prompt-injection rules) and ``first_words`` those of any alternation (the content
lexicons); ``WordStarts`` indexes a text by its words once, so each pattern tries
``match`` only where a word begins with one of its heads, in order and without overlaps:
the matches its search would find.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import regex


def _closing(s: str, j: int, depth: int, opener: str, closer: str) -> int:
    """The index just past the ``closer`` that brings ``depth`` to 0, from ``s[j]``;
    escapes skipped, and (for groups) whole classes."""
    while j < len(s):
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == "[" and opener == "(":
            j = _class_end(s, j)
            continue
        if c == opener:
            depth += 1
        elif c == closer:
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    raise ValueError(f"unbalanced {opener}{closer} in {s!r}")


def _class_end(s: str, i: int) -> int:
    """The index just past the character class that opens at ``s[i]`` ("["): a "]"
    first (after "[" or "[^") is literal, nested sets (regex V1) are counted."""
    j = i + 1
    if s.startswith("^", j):
        j += 1
    if s.startswith("]", j):
        j += 1
    return _closing(s, j, 1, "[", "]")


def _group_end(s: str, i: int) -> int:
    """The index just past the group that opens at ``s[i]`` ("(")."""
    return _closing(s, i, 0, "(", ")")


def _alternatives(group: str) -> list[str]:
    """The top-level alternatives of a "(?:a|b|c)" group's source."""
    inner, out, start, j = group[3:-1], [], 0, 0
    while j < len(inner):
        c = inner[j]
        if c == "\\":
            j += 2
            continue
        if c in "([":
            j = _group_end(inner, j) if c == "(" else _class_end(inner, j)
            continue
        if c == "|":
            out.append(inner[start:j])
            start = j + 1
        j += 1
    return [*out, inner[start:]]


# Group openings the analysis understands; any other "(?" (an inline flag such as "(?x)"
# or "(?i)", whose effect runs on into later alternatives; a comment; a branch reset; a
# conditional) makes a pattern's heads unknown.
_UNKNOWN_GROUP = regex.compile(r"\(\?(?![:=!]|<[=!]|P?<\w+>)")


# What ends a word right after a literal run (a space, a word boundary): a match whose
# first word is such a run starts at a word that is exactly that run.
WORD_ENDS = (" ", "\\b")


# A literal character that no word holds (an escaped one, "\.", "\-", whitespace "\s",
# or a plain one that is not a pattern's syntax, "'", ",", "-"): like a space, it ends
# the word before it, where words are what "\b" judges (``\w``: "\b" in ``ends``). A
# caller whose words hold more (the lexicons' ``[\p{L}\p{N}]+``: a Tamil numeral is
# not ``\w``) does not pass "\b", and keeps such a run a prefix.
_NON_WORD_LITERAL = regex.compile(r"\\[^\w]|\\s|[^\w\\.\[\](){}?*+|^$]")


def first_words(alternation: str, ends: tuple[str, ...] = WORD_ENDS) -> list[str] | None:
    """The literal start of the first word of every alternative of a group's source
    ("(?:ignore[zs]?|pay no|colou?r|(?:a|b)c)" -> ignore, "pay ", colo, a, b): a word
    ending in a space is whole (what follows it in the pattern starts with one of
    ``ends``, or, with "\\b" among them, a literal character no ``\\w`` holds; not made
    optional), the others are prefixes. None when an alternative may
    start otherwise (a class, an optional part, an escape) or the source holds a group
    the analysis does not know (an inline flag, a comment)."""
    if _UNKNOWN_GROUP.search(alternation):
        return None
    try:
        return _first_words(alternation, ends)
    except ValueError:  # unbalanced as read here: not known
        return None


def _first_words(alternation: str, ends: tuple[str, ...]) -> list[str] | None:
    out: list[str] = []
    for alt in _alternatives(alternation):
        alt = alt.removeprefix("\\b")  # zero-width: the match starts where it holds
        if alt.startswith("(?:"):
            end = _group_end(alt, 0)
            nested = _first_words(alt[:end], ends)
            if nested is None or alt[end:end + 1] in ("?", "*", "{"):
                return None
            out += nested
            continue
        run = regex.match(r"[a-z0-9]*", alt).group()  # type: ignore[union-attr]
        rest = alt[len(run):]
        if rest[:1] in ("?", "*", "{"):
            run = run[:-1]  # its last letter is optional
        if not run:
            return None
        ender = next((e for e in ends if rest.startswith(e)), None)
        if (ender is None and "\\b" in ends
                and (literal := _NON_WORD_LITERAL.match(rest)) is not None):
            ender = literal.group()  # "a\.i\.": a match starts at the word "a" itself
        whole = ender is not None and rest[len(ender):len(ender) + 1] not in ("?", "*", "{")
        out.append(run + " " if whole else run)
    return out


def head_words(pattern: str) -> tuple[str, ...] | None:
    """The shortest set of literal word starts of which every match of ``pattern`` begins
    with one, at the start of a word (no one a prefix of another): every top-level
    alternative must begin, past "\\b" and any lookarounds (zero-width), with literal
    words or a group of such alternatives, a "\\b" met on the way to each
    ("\\b(?:a|b)...", "(?:\\ba|\\bb)...", "\\bx...|\\b(?:y|z)..."). None for any
    other pattern."""
    if _UNKNOWN_GROUP.search(pattern):
        return None
    try:
        words = _alternation_heads(pattern, bounded=False)
    except ValueError:  # unbalanced as read here: not known
        return None
    return None if words is None else shortest_prefixes(words)


_LOOKAROUNDS = ("(?=", "(?!", "(?<=", "(?<!")


def _alternation_heads(source: str, *, bounded: bool) -> list[str] | None:
    out: list[str] = []
    for alt in _alternatives(f"(?:{source})"):
        words = _alternative_heads(alt, bounded=bounded)
        if words is None:
            return None
        out += words
    return out


def _alternative_heads(alt: str, *, bounded: bool) -> list[str] | None:
    """The word starts every match of one alternative begins with (``bounded``: a "\\b"
    holds where it starts)."""
    while True:  # zero-width parts first: the match starts where the literal does
        if alt.startswith("\\b"):
            alt, bounded = alt[2:], True
        elif alt.startswith(_LOOKAROUNDS):
            end = _group_end(alt, 0)
            if alt[end:end + 1] in ("?", "*", "{"):
                return None
            alt = alt[end:]
        else:
            break
    if alt.startswith("(?:"):
        end = _group_end(alt, 0)
        quantifier = alt[end:end + 1]
        if quantifier in ("*", "{", "+"):
            return None
        # What follows the group is not read: its words are prefixes (a superset).
        group = _alternation_heads(alt[3:end - 1], bounded=bounded)
        if quantifier != "?":
            return group
        # An optional group: the match starts with it or with what follows it.
        rest = _alternative_heads(alt[end + 1:], bounded=bounded)
        return None if group is None or rest is None else group + rest
    if not bounded:
        return None
    return _first_words(f"(?:{alt})", WORD_ENDS)


def shortest_prefixes(words: list[str]) -> tuple[str, ...]:
    """``words`` (prefixes, and whole words ending in a space) without those another
    prefix covers, sorted: the same set of words begins with one of them."""
    prefixes = sorted({w for w in words if not w.endswith(" ")})
    kept = [w for i, w in enumerate(prefixes) if not any(w.startswith(v) for v in prefixes[:i])]
    whole = sorted({w for w in words if w.endswith(" ")
                    and not any(w.startswith(v) for v in kept)})
    return tuple(sorted(kept + whole))


class WordStarts:
    """Where each word of a text starts (``word``: what a word is, as the patterns'
    word boundaries judge it)."""

    def __init__(self, text: str, word: regex.Pattern[str]) -> None:
        starts: dict[str, list[int]] = {}
        for m in word.finditer(text):
            starts.setdefault(m.group(), []).append(m.start())
        self._starts = starts
        self._words = sorted(starts)

    def of(self, heads: tuple[str, ...]) -> list[int]:
        """The starts of the words that begin with one of ``heads`` (or are one that ends
        in a space, without it), in order."""
        out: list[int] = []
        words = self._words
        for head in heads:
            if head.endswith(" "):
                out += self._starts.get(head[:-1], ())
                continue
            i = bisect.bisect_left(words, head)
            while i < len(words) and words[i].startswith(head):
                out += self._starts[words[i]]
                i += 1
        out.sort()
        return out


def matches_at(pattern: regex.Pattern[str], text: str, positions: list[int]
               ) -> Iterator[regex.Match[str]]:
    """``pattern``'s matches in ``text`` that start at one of ``positions`` (ascending),
    non-overlapping, in order: ``pattern.finditer(text)``'s, when every match starts at
    one of them."""
    end = 0
    for pos in positions:
        if pos < end:
            continue
        m = pattern.match(text, pos)
        if m is not None:
            yield m
            end = m.end()
