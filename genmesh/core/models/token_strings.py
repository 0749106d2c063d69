"""Each token's own string, as logprobs report it (OpenAI's ``token`` and ``bytes``): the
bytes the token adds to the text, and those bytes decoded alone, with U+FFFD where the
token holds only part of a UTF-8 character.

HF ``tokenizers`` has no call for a token's bytes; they follow from the decoder that
``tokenizer.json`` names. Byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2) spells each byte
as one printable character; SentencePiece-style decoders (Llama 2, Mistral, Gemma) spell a
space as "▁" and a byte without a token of its own as "<0xNN>". An added token (e.g.
"<|im_end|>") is its own content. Under any other decoder a token is decoded alone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from genmesh.core.models.detokenizer import special_token_ids

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable character → the byte it spells (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, shift = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + shift)] = byte
            shift += 1
    return chars


_BYTE_OF = _byte_level_alphabet()


@dataclass(frozen=True, slots=True)
class TokenString:
    text: str  # ``raw`` decoded alone (U+FFFD for a part of a character)
    raw: bytes  # the bytes the token adds to the text


def _decoders(tokenizer: Tokenizer) -> list[dict[str, Any]]:
    """The tokenizer's decoders, a Sequence unpacked."""
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    if decoder.get("type") == "Sequence":
        return list(decoder.get("decoders", []))
    return [decoder] if decoder else []


class TokenStrings:
    """The strings of one tokenizer's tokens, computed on first use and kept (at most one
    entry per vocabulary id)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        decoders = _decoders(tokenizer)
        kinds = {d.get("type") for d in decoders}
        self._is_byte_level = "ByteLevel" in kinds
        self._has_byte_fallback = "ByteFallback" in kinds
        # (what the vocabulary writes, what the text has) of the decoders that replace
        self._replacements = [(d["pattern"]["String"], d["content"]) for d in decoders
                              if d.get("type") == "Replace" and "String" in d.get("pattern", {})]
        self._replacements += [(d.get("replacement", "▁"), " ") for d in decoders
                               if d.get("type") == "Metaspace"]
        self._is_known = self._is_byte_level or bool(self._replacements)
        self._added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        # The ids a text leaves out when it skips special tokens.
        self.special_ids = special_token_ids(tokenizer)
        self._strings: dict[int, TokenString] = {}

    def __call__(self, token_id: int) -> TokenString:
        found = self._strings.get(token_id)
        if found is None:
            raw = self._raw(token_id)
            found = self._strings[token_id] = TokenString(raw.decode("utf-8", "replace"), raw)
        return found

    def _raw(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        token = self._tokenizer.id_to_token(token_id)
        if token is None:  # outside the tokenizer's vocabulary (a padded embedding row)
            return b""
        if not self._is_known:
            return self._tokenizer.decode([token_id], skip_special_tokens=False).encode()
        if self._is_byte_level:
            return b"".join(bytes((_BYTE_OF[c],)) if c in _BYTE_OF else c.encode()
                            for c in token)
        if self._has_byte_fallback and (byte := _BYTE_FALLBACK.fullmatch(token)):
            return bytes((int(byte.group(1), 16),))
        for written, meant in self._replacements:
            token = token.replace(written, meant)
        return token.encode()
