"""Text normalization that keeps the detectors working on obfuscated text.

An attacker hides a phrase from pattern matching by writing it in look-alike characters
(Cyrillic "о" for "o", fullwidth "ｉ", mathematical "𝐢"), by splitting it with invisible
characters ("ig\u200bnore") or combining marks ("ïgnörè"), by leetspeak ("1gn0r3"), by
spacing it out ("i g n o r e"), or by encoding it (base64, hex, %xx, rot13, backwards).

``fold`` undoes the character-level tricks and remembers where every folded character came
from, so a match found on the folded text is reported (and redacted) on the original.
``decoded_views`` returns the texts hidden in encodings, for the detectors to scan as well.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote


@dataclass(frozen=True, slots=True)
class Folded:
    """Folded text, and for each folded character where it came from in the original."""

    text: str  # the folded text
    # len(text) + 1 entries, non-decreasing: offsets[i] is the index in the original text of
    # the character that produced folded char i; the last entry is len(original)
    offsets: tuple[int, ...]

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The original text's [start, end) for folded [start, end).

        A folded character owns the original characters from its offset up to the next
        folded character's: invisible characters, combining marks and collapsed whitespace
        go with the character before them, so redacting the span removes them too. A
        character that folded into several ("ﬁ" into "fi") is returned whole even when the
        span covers only part of it."""
        if not 0 <= start <= end <= len(self.text):
            raise ValueError(
                f"span [{start}, {end}) is outside the folded text (length {len(self.text)})")
        if start == end:
            return self.offsets[start], self.offsets[start]
        return self.offsets[start], max(self.offsets[end], self.offsets[end - 1] + 1)


# Characters that render as nothing. fold drops every format character (category Cf:
# zero-width and bidi controls, and the tag block used to smuggle invisible ASCII). The
# Hangul fillers are letters that render blank, so they have to be named to be dropped.
_ZERO_WIDTH = "\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff\u00ad\u180e\u034f"
_BIDI_CONTROLS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u061c"
_BLANK_LETTERS = "\u115f\u1160\u3164\uffa0"
_DROPPED = frozenset(_ZERO_WIDTH + _BIDI_CONTROLS + _BLANK_LETTERS)

# Look-alikes that NFKC leaves alone, mapped to the ASCII letter they imitate. Keys are
# looked up before casefolding as well as after, because some capitals imitate a different
# letter than their lowercase does (Greek "Η" looks like H, "η" like n). Fullwidth,
# mathematical, circled and ligature forms (and "ℓ", "ſ") need no entry: NFKC does them.
_CONFUSABLES: dict[str, str] = {
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p",
    "с": "c", "т": "t", "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d",
    "ԛ": "q", "ԝ": "w", "ү": "y", "һ": "h", "ӏ": "l",
    "А": "a", "В": "b", "Е": "e", "К": "k", "М": "m", "Н": "h", "О": "o", "Р": "p",
    "С": "c", "Т": "t", "У": "y", "Х": "x", "І": "i", "Ј": "j", "Ѕ": "s", "Ԁ": "d",
    "Ԛ": "q", "Ԝ": "w", "Ү": "y", "Һ": "h", "Ӏ": "l",
    # Greek
    "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v",
    "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ϲ": "c", "ϳ": "j",
    "Α": "a", "Β": "b", "Ε": "e", "Ζ": "z", "Η": "h", "Ι": "i", "Κ": "k", "Μ": "m",
    "Ν": "n", "Ο": "o", "Ρ": "p", "Τ": "t", "Υ": "y", "Χ": "x",
    # Cyrillic and Greek letters of "fancy text" that look like other Latin letters
    "я": "r", "Я": "r", "є": "e", "Є": "e", "σ": "o", "ς": "c", "д": "a", "ц": "u",
    "ш": "w", "щ": "w", "п": "n", "и": "u", "ƒ": "f", "¢": "c",
    # Letters with a stroke, which NFD does not split
    "ø": "o", "Ø": "o", "ł": "l", "Ł": "l", "đ": "d", "Đ": "d", "ħ": "h", "Ħ": "h",
    "ŧ": "t", "Ŧ": "t", "ƀ": "b", "ɨ": "i", "ʉ": "u", "ɇ": "e", "ɏ": "y", "ƶ": "z",
    "ǥ": "g", "ȼ": "c",
    # Armenian
    "օ": "o", "ս": "u", "հ": "h", "ո": "n", "ց": "g",
    # Latin look-alikes and small capitals
    "ı": "i", "ȷ": "j", "ɑ": "a", "ɡ": "g", "ɩ": "i", "ǀ": "l", "ꞁ": "l", "ɛ": "e",
    "ᴀ": "a", "ʙ": "b", "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ɢ": "g", "ʜ": "h", "ɪ": "i",
    "ᴊ": "j", "ᴋ": "k", "ʟ": "l", "ᴍ": "m", "ɴ": "n", "ᴏ": "o", "ᴘ": "p", "ʀ": "r",
    "ꜱ": "s", "ᴛ": "t", "ᴜ": "u", "ᴠ": "v", "ᴡ": "w", "ʏ": "y", "ᴢ": "z",
}  # fmt: skip

# Leetspeak, applied only to runs of these characters that touch a letter (see _unleet).
# The one-symbol leetspeak, one character for one (also how words are cut: injection).
LEET = str.maketrans("01345789@$!|", "oieastbgasil")
_LEET_RUN = re.compile(r"[01345789@$!|]+")
_ASCII_LETTERS = frozenset(string.ascii_lowercase)
_DOMAIN = re.compile(r"[a-z0-9-]+\.[a-z]")

# The ASCII fast path of fold: lowercase, and every whitespace character becomes a space
# (str.lower and a regex substitution: str.translate looks up every character, ~60 ns).
_ASCII_WHITESPACE = re.compile("[\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f]")
_SPACE_RUN = re.compile(" {2,}")


def _strip_marks(text: str) -> str:
    """``text`` without combining marks; NFC puts back what NFD split that was no mark
    (Hangul syllables would otherwise come out as loose jamo)."""
    decomposed = unicodedata.normalize("NFD", text)
    kept = "".join(c for c in decomposed if unicodedata.category(c) != "Mn")
    return unicodedata.normalize("NFC", kept)


@lru_cache(maxsize=1 << 16)
def _fold_char(ch: str) -> str:
    """What one original character folds into: "" (dropped), one character, or several
    (ligatures, "ß"). Cached: a prompt uses few distinct characters. Stripping every Mn
    also strips Indic viramas and Thai vowel signs, so a pattern matched against folded
    text has to be folded too; the original text is never changed."""
    if ch in _DROPPED or unicodedata.category(ch) == "Cf":
        return ""
    if ch.isspace():
        return " "
    folded = []
    for c in _strip_marks(unicodedata.normalize("NFKC", ch)):
        look_alike = _CONFUSABLES.get(c)
        if look_alike is not None:
            folded.append(look_alike)
        else:
            folded.extend(_CONFUSABLES.get(d, d) for d in c.casefold())
    # casefold can bring marks back ("İ" -> "i̇"), NFKC spaces ("¨" -> " ̈")
    return "".join(" " if c.isspace() else c for c in _strip_marks("".join(folded)))


def _unleet(text: str) -> str:
    """Leet digits and symbols read as letters where they touch a letter ("1gn0r3",
    "pr3v10u5"), decided on the unmapped text so it stays one linear pass. Runs that touch
    another digit are part of a number ("x86", "2024"), and a "!" ending a word is
    punctuation ("hello!"), so both stay; so do numbers away from letters ("3.14", "$5")
    and the "@" of an e-mail address."""
    pieces = []
    pos = 0
    for m in _LEET_RUN.finditer(text):
        start, end = m.span()
        before = text[start - 1] if start else ""
        after = text[end] if end < len(text) else ""
        if before.isdigit() or after.isdigit():
            continue
        if m.group() == "@" and _DOMAIN.match(text, end):
            continue
        if after in _ASCII_LETTERS:
            stop = end
        elif before in _ASCII_LETTERS:
            stop = start + len(m.group().rstrip("!"))
        else:
            continue
        pieces += [text[pos:start], text[start:stop].translate(LEET)]
        pos = stop
    if not pieces:
        return text
    pieces.append(text[pos:])
    return "".join(pieces)


def _collapse_spaces(text: str, offsets: Sequence[int]) -> tuple[str, Sequence[int]]:
    """Runs of spaces become their first space; the others leave the offsets too."""
    if "  " not in text:
        return text, offsets
    parts: list[str] = []
    kept: list[int] = []
    pos = 0
    for m in _SPACE_RUN.finditer(text):
        stop = m.start() + 1
        parts.append(text[pos:stop])
        kept.extend(offsets[pos:stop])
        pos = m.end()
    parts.append(text[pos:])
    kept.extend(offsets[pos:])
    return "".join(parts), kept


@lru_cache(maxsize=4)
def _fold_chars(text: str) -> tuple[str, Sequence[int]]:
    """``text`` with each character folded (``_fold_char``), and where each folded
    character came from. Kept for the last few texts: a check folds a prompt with and
    without leetspeak, and the per-character pass is most of a long non-ASCII text's
    fold."""
    if text.isascii():
        # No ASCII character is dropped or expands, so the offsets are the identity.
        return _ASCII_WHITESPACE.sub(" ", text.lower()), range(len(text))
    pieces = list(map(_fold_char, text))
    folded = "".join(pieces)
    if len(folded) == len(text) and "" not in pieces:
        return folded, range(len(text))
    return folded, tuple(i for i, piece in enumerate(pieces) for _ in piece)


def fold(text: str, *, leet: bool = True) -> Folded:
    """``text`` with invisible characters dropped, compatibility forms (fullwidth,
    ligatures, mathematical letters) and look-alikes mapped to plain lowercase letters,
    combining marks removed, leetspeak read as letters (unless ``leet`` is False) and
    whitespace runs collapsed to one space."""
    folded, offsets = _fold_chars(text)
    if leet:
        folded = _unleet(folded)
    folded, offsets = _collapse_spaces(folded, offsets)
    return Folded(folded, (*offsets, len(text)))


# Leetspeak drawn with several symbols a letter ("|\|" n, "|_|" u, "()" o, "/\" a,
# "\/\/" w, "|<" k, "><" x) and with symbols no single-letter reading takes ("€" e, "(" c):
# read back only inside a word that holds one such glyph and a letter or leet digit, so
# code ("f()", "a || b"), arrows ("<-") and prices ("€5") stay as they are. Longer glyphs
# first: "|\/|" is m, not "|" and "\/". Not "|3" (b) or "|o" (p): one-symbol leetspeak
# reads them "le" and "lo" ("ru|3s").
_GLYPHS = {
    "\\/\\/": "w", "|\\/|": "m", "/\\/\\": "m", "|\\|": "n", "/\\/": "n", "|_|": "u",
    "|-|": "h", "]-[": "h", "}{": "h", "|<": "k", "|{": "k", "><": "x", "()": "o",
    "[]": "o", "/\\": "a", "\\/": "v", "|_": "l", "|)": "d", "|]": "d", "|2": "r",
    "|>": "p", "|*": "p", "€": "e", "£": "l", "ß": "b", "¥": "y", "©": "c", "®": "r",
    "vv": "w", "/-\\": "a", "|=": "f", "`/": "y", "(_+": "g", "(_": "g", "|^|": "n",
    "|\\": "n", "[)": "d", "'|'": "t",
}  # fmt: skip
_GLYPH = re.compile("|".join(re.escape(g) for g in sorted(_GLYPHS, key=len, reverse=True)))
# In a glyph word, these single symbols are letters too ("<" and "(" c, "#" h, "6" g).
_GLYPH_SINGLE = str.maketrans("(<#6+", "cchgt")
_LETTER_OR_SYMBOL = re.compile(r"[A-Za-z$@!|+]")


def glyph_words(text: str) -> list[tuple[int, int]]:
    """The [start, end) of each word of ``text`` that ``unglyph`` reads back: one with a
    glyph and a letter or leet symbol, or two glyphs (not "€50")."""
    out = []
    end = 0
    # Each glyph widened to its word, once a word: linear in the text.
    for m in _GLYPH.finditer(text):
        if m.start() < end:
            continue
        start = m.start()
        while start > end and not text[start - 1].isspace():
            start -= 1
        end = m.end()
        while end < len(text) and not text[end].isspace():
            end += 1
        rest, num_glyphs = _GLYPH.subn("", text[start:end])
        if num_glyphs > 1 or _LETTER_OR_SYMBOL.search(rest):
            out.append((start, end))
    return out


def unglyph(text: str) -> str:
    """``text`` with the multi-symbol leetspeak of its glyph words read as letters (the
    one-symbol leetspeak is ``fold``'s); ``text`` itself when it has none."""
    spans = glyph_words(text)
    if not spans:
        return text
    pieces, pos = [], 0
    for a, b in spans:
        word = _GLYPH.sub(lambda m: _GLYPHS[m.group()], text[a:b])
        pieces += [text[pos:a], word.translate(_GLYPH_SINGLE)]
        pos = b
    pieces.append(text[pos:])
    return "".join(pieces)


# Encoded runs worth decoding. The hex run takes pairs plain ("69676e"), separated by
# spaces, commas or colons, or prefixed ("\x69", "0x69"), and starts at no letter or digit
# (the "de" of "Decode: 49 67 ..." is not its first byte); every choice is settled by the
# next character, so the patterns stay linear.
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
_HEX_RUN = re.compile(r"(?<![0-9A-Za-z])(?:(?:\\x|0[xX])?[0-9A-Fa-f]{2}[\s,;:]{0,3}){8,}")
_HEX_PAIR = re.compile(r"(?:\\x|0[xX])?([0-9A-Fa-f]{2})")
_URL_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_TAG_RUN = re.compile("[\U000e0020-\U000e007e]+")
_BASE32_RUN = re.compile(r"(?<![A-Za-z0-9])[A-Z2-7]{16,}={0,6}(?![A-Za-z0-9])")
# Eight or more Morse letters (dots and dashes), apart by spaces; words by "/" or 2+ spaces.
_MORSE_RUN = re.compile(r"(?<![\w.\-])[.\-]{1,7}(?:(?: {1,3}| ?/ ?)[.\-]{1,7}){7,}")
_MORSE = dict(zip(
    (".-", "-...", "-.-.", "-..", ".", "..-.", "--.", "....", "..", ".---", "-.-", ".-..",
     "--", "-.", "---", ".--.", "--.-", ".-.", "...", "-", "..-", "...-", ".--", "-..-",
     "-.--", "--..", "-----", ".----", "..---", "...--", "....-", ".....", "-....", "--...",
     "---..", "----.", ".-.-.-", "--..--", "..--..", "-.-.--", "---...", ".----.", "-....-"),
    "abcdefghijklmnopqrstuvwxyz0123456789.,?!:'-", strict=True))
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")
_ASCII_LETTER = re.compile("[A-Za-z]")
# Four or more words (two or more letters, apart by whitespace and punctuation) in a row:
# enough text that reading it backwards could mean something.
_WORD_RUN = re.compile(r"\b[^\W\d_]{2,}(?:[^\w\s]*\s+[^\w\s]*[^\W\d_]{2,}\b){3,}")
_MIN_LETTERS = 4
_BINARY_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_MIN_PRINTABLE = 0.85


def _is_readable(text: str) -> bool:
    """Mostly printable, with a few letters and no control characters but line breaks and
    tabs: decoded text rather than decoded binary (a hash digest, a random token, an
    English word that happens to be valid base64). Some unprintable characters (no-break
    or zero-width spaces) are allowed: the hidden text may be obfuscated too."""
    if _BINARY_CONTROL.search(text):
        return False
    num_printable = sum(1 for c in text if c.isprintable() or c in "\t\n\r")
    num_letters = sum(1 for c in text if c.isalpha())
    return num_letters >= _MIN_LETTERS and num_printable >= _MIN_PRINTABLE * len(text)


def _readable(data: bytes) -> str | None:
    """``data`` as text when it is valid, readable UTF-8. Random bytes are seldom valid
    UTF-8, which rejects most binary before counting; a multi-byte character cut off at
    the end (a truncated run) is let go rather than rejecting the rest."""
    try:
        decoded = codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError:
        return None
    return decoded if _is_readable(decoded) else None


def _base64_texts(text: str) -> list[str]:
    texts = []
    for m in _BASE64_RUN.finditer(text):
        body = m.group().rstrip("=").translate(_URLSAFE_TO_STANDARD)
        body = body[: len(body) - 1] if len(body) % 4 == 1 else body  # a stray last char
        try:
            data = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        if (decoded := _readable(data)) is not None:
            texts.append(decoded)
    return texts


def _hex_texts(text: str) -> list[str]:
    texts = []
    for m in _HEX_RUN.finditer(text):
        data = bytes.fromhex("".join(_HEX_PAIR.findall(m.group())))
        if (decoded := _readable(data)) is not None:
            texts.append(decoded)
    return texts


def _url_texts(text: str) -> list[str]:
    """Whitespace-free tokens with two or more %xx escapes, unquoted."""
    if "%" not in text:
        return []
    texts = []
    for token in text.split():
        if len(_URL_ESCAPE.findall(token)) < 2:
            continue
        try:
            decoded = unquote(token, errors="strict")
        except UnicodeDecodeError:
            continue
        if _is_readable(decoded):
            texts.append(decoded)
    return texts


def _tag_texts(text: str) -> list[str]:
    """ASCII written in the invisible Unicode tag block (U+E0020-U+E007E)."""
    texts = ("".join(chr(ord(c) - 0xE0000) for c in m.group()) for m in _TAG_RUN.finditer(text))
    return [t for t in texts if _is_readable(t)]


def _base32_texts(text: str) -> list[str]:
    texts = []
    for m in _BASE32_RUN.finditer(text):
        body = m.group().rstrip("=")
        try:
            data = base64.b32decode(body + "=" * (-len(body) % 8))
        except (binascii.Error, ValueError):
            continue
        if (decoded := _readable(data)) is not None:
            texts.append(decoded)
    return texts


def _morse_texts(text: str) -> list[str]:
    """Morse code read back: letters apart by spaces, words by a slash or 2+ spaces."""
    if ".-" not in text and "-." not in text:
        return []
    texts = []
    for m in _MORSE_RUN.finditer(text):
        words = re.split(r" ?/ ?| {2,}", m.group())
        decoded = " ".join("".join(_MORSE.get(code, "?") for code in word.split())
                           for word in words)
        if decoded.count("?") <= len(decoded) // 10 and _is_readable(decoded):
            texts.append(decoded)
    return texts


def _decoded(text: str) -> list[str]:
    return (_base64_texts(text) + _base32_texts(text) + _hex_texts(text) + _url_texts(text)
            + _tag_texts(text) + _morse_texts(text))


def decoded_views(text: str, *, max_views: int = 8) -> list[str]:
    """The texts hidden in ``text``, for the detectors to scan too: what base64, base32,
    hex, %xx, Unicode tag and Morse runs decode to (again once more, for one level of
    nesting), longest first; then the whole text in rot13 and backwards, which are too
    cheap to guess about and only the detectors can judge. At most ``max_views``."""
    if max_views <= 0:
        return []
    first = _decoded(text)
    nested = [inner for outer in first for inner in _decoded(outer)]
    views = sorted(dict.fromkeys(v for v in first + nested if v != text), key=len, reverse=True)
    if _ASCII_LETTER.search(text):
        views.append(codecs.encode(text, "rot13"))  # only ASCII letters; ~3x translate
    if _WORD_RUN.search(text):
        views.append(text[::-1])
    return views[:max_views]
