"""Incremental detokenization: text for token ids that arrive a few at a time."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer

# What a decoder puts where bytes are not (yet) a whole UTF-8 character.
REPLACEMENT_CHAR = "\ufffd"


def special_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """The ids that ``decode(..., skip_special_tokens=True)`` leaves out."""
    return frozenset(i for i, token in tokenizer.get_added_tokens_decoder().items()
                     if token.special)


class IncrementalDetokenizer:
    """Releases the text of streamed token ids once it is final.

    The prefix/read-offset algorithm of vLLM. The decode window holds the tokens whose
    text was released last (the context) followed by the tokens not yet released.
    Each step decodes the window and the context alone; the difference is the new text.
    Decoding the context again keeps decoders that look at neighbouring tokens
    (leading-space stripping, byte fallback) in step with a decode of the whole
    sequence. New text is held back while the window's decode ends in U+FFFD, i.e.
    while a UTF-8 character is incomplete.

    Invariants: the text released so far equals ``tokenizer.decode(ids)`` of the ids
    pushed up to the last release, and the window starts where the previous release
    started, so each step decodes a few tokens, not the whole sequence.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Skipped tokens decode to nothing; dropping them on arrival keeps a run of them
        # from growing the window.
        self._skipped_ids = special_token_ids(tokenizer) if skip_special_tokens else frozenset()
        self._window_ids: list[int] = []
        self._num_context_ids = 0  # leading window ids whose text is already released
        self._context_text = ""  # decode(window_ids[:num_context_ids])

    def push(self, token_ids: Iterable[int]) -> str:
        """Adds ids; returns the text that became final (often empty mid-character)."""
        self._window_ids.extend(i for i in token_ids if i not in self._skipped_ids)
        return self._release(is_final=False)

    def flush(self) -> str:
        """Releases everything held back, a dangling U+FFFD included, and starts over:
        ids pushed later begin a new text."""
        text = self._release(is_final=True)
        self._window_ids, self._num_context_ids, self._context_text = [], 0, ""
        return text

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _release(self, *, is_final: bool) -> str:
        if len(self._window_ids) == self._num_context_ids:
            return ""
        text = self._decode(self._window_ids)
        if len(text) <= len(self._context_text):
            return ""  # the new ids added no text yet
        if text.endswith(REPLACEMENT_CHAR) and not is_final:
            return ""  # a character is incomplete; a later id may complete it
        new_text = text[len(self._context_text):]
        # The released ids become the next window's context.
        del self._window_ids[:self._num_context_ids]
        self._num_context_ids = len(self._window_ids)
        self._context_text = self._decode(self._window_ids)
        return new_text
