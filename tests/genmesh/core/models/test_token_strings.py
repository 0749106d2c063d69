"""Token strings against the real SmolLM2 tokenizer (byte-level BPE) and a small
SentencePiece-style one (a "▁" for a space, "<0xNN>" byte fallback)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers

from genmesh.core.models.detokenizer import REPLACEMENT_CHAR
from genmesh.core.models.token_strings import TokenString, TokenStrings


@pytest.fixture(scope="module")
def smollm2(model_dir) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def test_byte_level_tokens_give_back_the_text_s_bytes(smollm2):
    strings = TokenStrings(smollm2)
    text = "Hello wörld, 日本 😀!"
    ids = smollm2.encode(text, add_special_tokens=False).ids
    assert b"".join(strings(i).raw for i in ids) == text.encode()
    # Whole characters read as the token decoded alone; a part of one as U+FFFD.
    for i in ids:
        s = strings(i)
        assert s.text == s.raw.decode("utf-8", "replace")
        if REPLACEMENT_CHAR not in s.text:
            assert s.text == smollm2.decode([i])
    assert any(REPLACEMENT_CHAR in strings(i).text for i in ids)  # 日 and 😀 span tokens


def test_a_special_token_is_its_content_and_counts_as_special(smollm2):
    strings = TokenStrings(smollm2)
    end = smollm2.token_to_id("<|im_end|>")
    assert strings(end) == TokenString("<|im_end|>", b"<|im_end|>")
    assert end in strings.special_ids
    assert strings(smollm2.get_vocab_size() + 10) == TokenString("", b"")


def sentencepiece_like() -> Tokenizer:
    vocab = {"<unk>": 0, "▁": 1, "▁hello": 2, "h": 3, "e": 4, "l": 5, "o": 6,
             **{f"<0x{b:02X}>": 7 + b for b in range(256)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>",
                                     byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                 normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tokenizer


def test_sentencepiece_spaces_and_byte_fallback():
    tokenizer = sentencepiece_like()
    strings = TokenStrings(tokenizer)
    assert strings(2) == TokenString(" hello", b" hello")  # decoded alone: "hello"
    assert strings(7 + 0xC3) == TokenString(REPLACEMENT_CHAR, b"\xc3")
    ids = tokenizer.encode("hello é").ids
    assert b"".join(strings(i).raw for i in ids) == " hello é".encode()
