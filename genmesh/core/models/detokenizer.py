"""Incremental detokenization: text for token ids that arrive a few at a time.

Shared by the tokenizer service (its public Detokenize stream) and the frontend (which
detokenizes worker output in-process, so no token waits on a round trip).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# What a decoder puts where bytes are not (yet) a whole UTF-8 character.
REPLACEMENT_CHAR = "\ufffd"


def special_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """The ids that ``decode(..., skip_special_tokens=True)`` leaves out."""
    return frozenset(i for i, token in tokenizer.get_added_tokens_decoder().items()
                     if token.special)


class IncrementalDetokenizer:
    """Releases the text of streamed token ids once it is final.

    The stepping is HF ``tokenizers``' ``DecodeStream`` (the prefix/read-offset
    algorithm of vLLM, in Rust): its window holds the ids whose text was released last
    (the context) followed by the ids not yet released; each step decodes the window and
    the context, and the difference is the new text. Decoding the context again keeps
    decoders that look at neighbouring tokens (leading-space stripping, byte fallback) in
    step with a decode of the whole sequence. New text is held back while the window's
    decode ends in U+FFFD, i.e. while a UTF-8 character is incomplete.

    DecodeStream never releases a character that stays incomplete, so this class keeps
    the two id lists it needs to ``flush`` one: the ids of the last release (the
    stream's context) and the ids pushed since.

    Invariants: the text released so far equals ``tokenizer.decode(ids)`` of the ids
    pushed up to the last release; each step decodes a few tokens, not the sequence.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Skipped tokens decode to nothing; dropping them on arrival keeps a run of them
        # from growing the window.
        self._skipped_ids = special_token_ids(tokenizer) if skip_special_tokens else frozenset()
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._context_ids: list[int] = []  # the ids whose text was released last
        self._unreleased_ids: list[int] = []  # ids pushed since the last release

    def push(self, token_ids: Iterable[int]) -> str:
        """Adds ids; returns the text that became final (often empty mid-character)."""
        ids = [i for i in token_ids if i not in self._skipped_ids]
        if not ids:
            return ""
        # One id goes in as an int: the stream's cheapest call (the common case).
        text = self._stream.step(self._tokenizer, ids[0] if len(ids) == 1 else ids)
        if text is None:
            self._unreleased_ids += ids
            return ""
        self._context_ids = self._unreleased_ids + ids
        self._unreleased_ids = []
        return text

    def flush(self) -> str:
        """Releases everything held back, a dangling U+FFFD included, and starts over:
        ids pushed later begin a new text."""
        text = ""
        if self._unreleased_ids:
            context = self._decode(self._context_ids)
            window = self._decode(self._context_ids + self._unreleased_ids)
            text = window[len(context):]
        self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
        self._context_ids, self._unreleased_ids = [], []
        return text

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)
