"""IncrementalDetokenizer against the real SmolLM2 tokenizer (byte-level BPE)."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer

from services.tokenizer.detokenizer import (
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


class CountingTokenizer:
    """Wraps a tokenizer, recording how many ids each decode call gets."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decode_lengths: list[int] = []

    def get_added_tokens_decoder(self):
        return self.tokenizer.get_added_tokens_decoder()

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        self.decode_lengths.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_each_step_decodes_a_few_tokens_not_the_whole_sequence(tokenizer):
    counting = CountingTokenizer(tokenizer)
    ids = tokenizer.encode(" ".join(MULTILINGUAL) * 40).ids
    assert len(ids) > 2000
    chunks = stream(IncrementalDetokenizer(counting), ids)  # type: ignore[arg-type]
    assert "".join(chunks) == tokenizer.decode(ids)
    assert max(counting.decode_lengths) <= 8
    assert len(counting.decode_lengths) <= 2 * len(ids) + 1


def test_skipped_special_tokens_never_enter_the_decode_window(tokenizer):
    counting = CountingTokenizer(tokenizer)
    ids = [*tokenizer.encode("Hi").ids, *[2] * 50, *tokenizer.encode(" there").ids]
    chunks = stream(IncrementalDetokenizer(counting), ids)  # type: ignore[arg-type]
    assert "".join(chunks) == "Hi there"
    assert max(counting.decode_lengths) <= 2
