"""all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) in plain torch, from its bundled
safetensors and tokenizer.json.

It computes what sentence-transformers computes for this model (BERT, mean pooling over
the real tokens, L2 normalisation; tests check the embeddings agree), without importing
sentence-transformers and transformers: those imports took ~3 of the safety service's
~4 s of start-up, and a restarted safety service must serve again within seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer


class MiniLM:
    """``encode`` with sentence-transformers' arguments; weights in ``dtype``."""

    def __init__(self, folder: Path, *, max_seq_length: int = 256) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        if cfg.get("model_type") != "bert" or cfg.get("hidden_act") != "gelu":
            raise ValueError(f"{folder} is not a BERT model with GELU")
        self.num_layers = cfg["num_hidden_layers"]
        self.num_heads = cfg["num_attention_heads"]
        self.eps = cfg["layer_norm_eps"]
        self.max_seq_length = max_seq_length
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        weights = load_file(str(folder / "model.safetensors"))
        # Checkpoints name tensors with or without the "bert." prefix.
        self.w = {k.removeprefix("bert."): v for k, v in weights.items()}
        self.dtype = torch.float32

    def eval(self) -> MiniLM:
        return self

    def to(self, dtype: torch.dtype) -> MiniLM:
        self.w = {k: v.to(dtype) for k, v in self.w.items()}
        self.dtype = dtype
        return self

    def _ids(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, L] (padded with 0) and the mask of real tokens [B, L]."""
        encodings = self.tokenizer.encode_batch(list(texts))
        rows = [e.ids[:self.max_seq_length - 1] + e.ids[-1:] if len(e.ids) > self.max_seq_length
                else e.ids for e in encodings]  # truncated, keeping [SEP] last
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.int64)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = True
        return ids, mask

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"],
                            self.eps)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token states [B, L, H]."""
        w = self.w
        length = ids.shape[1]
        x = (F.embedding(ids, w["embeddings.word_embeddings.weight"])
             + w["embeddings.position_embeddings.weight"][:length]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = self._norm(x, "embeddings.LayerNorm")
        b, _, hidden = x.shape
        heads, d = self.num_heads, hidden // self.num_heads
        attn_mask = mask[:, None, None, :]  # [B, 1, 1, L]: attend to real tokens only
        for i in range(self.num_layers):
            p = f"encoder.layer.{i}"

            def split(t: torch.Tensor) -> torch.Tensor:
                return t.view(b, length, heads, d).transpose(1, 2)

            q = split(self._linear(x, f"{p}.attention.self.query"))
            k = split(self._linear(x, f"{p}.attention.self.key"))
            v = split(self._linear(x, f"{p}.attention.self.value"))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               scale=1 / math.sqrt(d))
            a = a.transpose(1, 2).reshape(b, length, hidden)
            x = self._norm(x + self._linear(a, f"{p}.attention.output.dense"),
                           f"{p}.attention.output.LayerNorm")
            h = F.gelu(self._linear(x, f"{p}.intermediate.dense"))
            x = self._norm(x + self._linear(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        return x

    def encode(self, texts: Sequence[str], *, batch_size: int = 32,
               convert_to_tensor: bool = True, normalize_embeddings: bool = True,
               show_progress_bar: bool = False) -> torch.Tensor:
        """Mean-pooled sentence embeddings [N, H] (unit norm when asked)."""
        del convert_to_tensor, show_progress_bar  # always a tensor, never a bar
        out = []
        for start in range(0, len(texts), max(batch_size, 1)):
            ids, mask = self._ids(texts[start:start + batch_size])
            states = self.forward(ids, mask).float()
            m = mask.unsqueeze(-1).float()
            pooled = (states * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)
            out.append(F.normalize(pooled, dim=-1) if normalize_embeddings else pooled)
        return torch.cat(out) if out else torch.empty(0, self.w[
            "embeddings.word_embeddings.weight"].shape[1])
