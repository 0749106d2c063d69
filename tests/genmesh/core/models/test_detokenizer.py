"""IncrementalDetokenizer against the real SmolLM2 tokenizer (byte-level BPE)."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer

from genmesh.core.models.detokenizer import (
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    special_token_ids,
)

MULTILINGUAL = [
    "héllo 😀 你好 ✓",
    "Grüße aus Köln, naïve café — ½ € ™",
    "日本語のテキストと한국어 텍스트, русский текст",
    "emoji runs: 👩‍👩‍👧‍👦🏳️‍🌈🇫🇷🤖🫠",
    "math ∑∫√∞ ≠ ≤ and arrows ←→⇒, then plain ASCII.",
]


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def stream(detokenizer: IncrementalDetokenizer, token_ids: list[int],
           chunk_sizes: list[int] | None = None) -> list[str]:
    """Pushes the ids in chunks (one at a time by default), then flushes; every call's
    text, in order, the flush's last."""
    sizes = iter(chunk_sizes or [])
    chunks, i = [], 0
    while i < len(token_ids):
        n = next(sizes, 1)
        chunks.append(detokenizer.push(token_ids[i:i + n]))
        i += n
    chunks.append(detokenizer.flush())
    return chunks


def test_holds_back_half_an_emoji_then_releases_it_whole(tokenizer):
    ids = tokenizer.encode("héllo 😀 你好 ✓").ids
    chunks = stream(IncrementalDetokenizer(tokenizer), ids)
    # The emoji and each CJK character span two byte-level tokens: the first of each
    # pair releases nothing.
    assert chunks == ["h", "é", "llo", "", " 😀", " ", "", "你", "", "好", "", "", " ✓", ""]


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_streamed_text_equals_the_full_decode_and_is_never_a_broken_character(
        tokenizer, text):
    ids = tokenizer.encode(text).ids
    chunks = stream(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(chunks) == tokenizer.decode(ids) == text
    assert not any(REPLACEMENT_CHAR in c for c in chunks)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_sequences_equal_the_full_decode_and_never_take_text_back(
        tokenizer, skip_special_tokens):
    rng = random.Random(7)
    # Ids of multilingual text split characters across tokens; random ids (special ones
    # included) add arbitrary byte fragments and broken sequences.
    pool = [i for text in MULTILINGUAL for i in tokenizer.encode(text).ids]
    pool += sorted(special_token_ids(tokenizer))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    for _ in range(300):
        ids = [rng.choice(pool) if rng.random() < 0.7 else rng.randrange(vocab_size)
               for _ in range(rng.randint(1, 40))]
        sizes = [rng.randint(1, 3) for _ in ids]
        expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        chunks = stream(IncrementalDetokenizer(tokenizer,
                                               skip_special_tokens=skip_special_tokens),
                        ids, sizes)
        released = ""
        for chunk in chunks:
            released += chunk
            assert expected.startswith(released), (ids, chunks)
        assert released == expected, (ids, chunks)


def test_flush_releases_a_dangling_replacement_char_only_at_a_broken_end(tokenizer):
    first_half_of_emoji = tokenizer.encode(" 😀").ids[:1]
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push(first_half_of_emoji) == ""
    assert detokenizer.flush() == " " + REPLACEMENT_CHAR == tokenizer.decode(first_half_of_emoji)


def test_after_a_flush_later_ids_start_a_new_text(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert stream(detokenizer, tokenizer.encode("one").ids)[-1] == ""
    assert "".join(stream(detokenizer, tokenizer.encode(" two 你").ids)) == " two 你"


@pytest.mark.parametrize(("skip_special_tokens", "expected"), [
    (True, "user\nHi 你好\n"),
    (False, "<|im_start|>user\nHi 你好<|im_end|>\n<|endoftext|>"),
])
def test_special_tokens_skipped_or_kept(tokenizer, skip_special_tokens, expected):
    ids = tokenizer.encode("<|im_start|>user\nHi 你好<|im_end|>\n<|endoftext|>").ids
    assert {1, 2, 0} <= set(ids)
    chunks = stream(IncrementalDetokenizer(tokenizer,
                                           skip_special_tokens=skip_special_tokens), ids)
    assert "".join(chunks) == expected
    assert expected == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class ReferenceDetokenizer:
    """The tokenizer service's detokenizer before it stepped with DecodeStream (vLLM's
    prefix/read-offset algorithm in Python): the oracle for each message's text."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.skipped_ids = special_token_ids(tokenizer) if skip_special_tokens else set()
        self.window_ids: list[int] = []
        self.num_context_ids, self.context_text = 0, ""

    def push(self, token_ids: list[int]) -> str:
        self.window_ids += [i for i in token_ids if i not in self.skipped_ids]
        return self._release(is_final=False)

    def flush(self) -> str:
        text = self._release(is_final=True)
        self.window_ids, self.num_context_ids, self.context_text = [], 0, ""
        return text

    def _release(self, *, is_final: bool) -> str:
        if len(self.window_ids) == self.num_context_ids:
            return ""
        text = self.tokenizer.decode(self.window_ids, skip_special_tokens=self.skip)
        if len(text) <= len(self.context_text) or (
                text.endswith(REPLACEMENT_CHAR) and not is_final):
            return ""
        new_text = text[len(self.context_text):]
        del self.window_ids[:self.num_context_ids]
        self.num_context_ids = len(self.window_ids)
        self.context_text = self.tokenizer.decode(self.window_ids, skip_special_tokens=self.skip)
        return new_text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_every_message_equals_the_reference_algorithm(tokenizer, skip_special_tokens):
    rng = random.Random(11)
    pool = [i for text in MULTILINGUAL for i in tokenizer.encode(text).ids]
    pool += sorted(special_token_ids(tokenizer))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    for _ in range(500):
        ids = [rng.choice(pool) if rng.random() < 0.7 else rng.randrange(vocab_size)
               for _ in range(rng.randint(1, 60))]
        sizes = [rng.randint(1, 4) for _ in ids]
        ours = stream(IncrementalDetokenizer(tokenizer,
                                             skip_special_tokens=skip_special_tokens),
                      ids, sizes)
        reference = stream(ReferenceDetokenizer(  # type: ignore[arg-type]
            tokenizer, skip_special_tokens=skip_special_tokens), ids, sizes)
        assert ours == reference, ids


def test_a_long_sequence_streams_whole(tokenizer):
    ids = tokenizer.encode(" ".join(MULTILINGUAL) * 40).ids
    assert len(ids) > 2000
    chunks = stream(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(chunks) == tokenizer.decode(ids)


def test_skipped_special_tokens_release_nothing_and_leave_the_text_whole(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push(tokenizer.encode("Hi").ids) == "Hi"
    assert detokenizer.push([2] * 50) == ""
    assert detokenizer.push(tokenizer.encode(" there").ids) == " there"
    assert detokenizer.flush() == ""
