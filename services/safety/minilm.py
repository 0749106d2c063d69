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
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer


def bert_layer(x: torch.Tensor, mask: torch.Tensor, w: Mapping[str, torch.Tensor], *,
               num_heads: int, eps: float, dropout: float = 0.0) -> torch.Tensor:
    """One BERT encoder layer (post-norm, GELU) over token states ``x`` [B, L, H], attending
    to the real tokens ``mask`` [B, L]; ``w`` holds the layer's tensors by their names in
    the checkpoint after ``encoder.layer.<i>.``. ``dropout`` > 0 only while training."""
    b, length, hidden = x.shape
    d = hidden // num_heads

    def linear(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(t, w[f"{name}.weight"], w[f"{name}.bias"])

    def norm(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, t.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, length, num_heads, d).transpose(1, 2)

    q = split(linear(x, "attention.self.query"))
    k = split(linear(x, "attention.self.key"))
    v = split(linear(x, "attention.self.value"))
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :],
                                       dropout_p=dropout, scale=1 / math.sqrt(d))
    a = a.transpose(1, 2).reshape(b, length, hidden)
    a = F.dropout(linear(a, "attention.output.dense"), dropout, dropout > 0)
    x = norm(x + a, "attention.output.LayerNorm")
    h = F.dropout(linear(F.gelu(linear(x, "intermediate.dense")), "output.dense"), dropout,
                  dropout > 0)
    return norm(x + h, "output.LayerNorm")


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of each row's real token states [B, H], from ``states`` [B, L, H]."""
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)


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
        self.layers = self._layers()
        self.dtype = torch.float32

    def eval(self) -> MiniLM:
        return self

    def to(self, dtype: torch.dtype) -> MiniLM:
        self.w = {k: v.to(dtype) for k, v in self.w.items()}
        self.layers = self._layers()
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

    def _layers(self) -> list[dict[str, torch.Tensor]]:
        """Each encoder layer's tensors, named as ``bert_layer`` reads them."""
        out = []
        for i in range(self.num_layers):
            prefix = f"encoder.layer.{i}."
            out.append({k.removeprefix(prefix): v for k, v in self.w.items()
                        if k.startswith(prefix)})
        return out

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor, *, stop: int | None = None
                ) -> torch.Tensor:
        """Token states [B, L, H] after the embeddings and layers ``0..stop-1`` (all by
        default)."""
        length = ids.shape[1]
        x = (F.embedding(ids, self.w["embeddings.word_embeddings.weight"])
             + self.w["embeddings.position_embeddings.weight"][:length]
             + self.w["embeddings.token_type_embeddings.weight"][0])
        x = self._norm(x, "embeddings.LayerNorm")
        return self.run_layers(x, mask, start=0, stop=self.num_layers if stop is None else stop)

    @torch.inference_mode()
    def run_layers(self, x: torch.Tensor, mask: torch.Tensor, *, start: int, stop: int
                   ) -> torch.Tensor:
        """Token states [B, L, H] after layers ``start..stop-1``, from ``x`` [B, L, H]."""
        for i in range(start, stop):
            x = bert_layer(x, mask, self.layers[i], num_heads=self.num_heads, eps=self.eps)
        return x

    def encode(self, texts: Sequence[str], *, batch_size: int = 32,
               convert_to_tensor: bool = True, normalize_embeddings: bool = True,
               show_progress_bar: bool = False) -> torch.Tensor:
        """Mean-pooled sentence embeddings [N, H] (unit norm when asked)."""
        del convert_to_tensor, show_progress_bar  # always a tensor, never a bar
        out = []
        for start in range(0, len(texts), max(batch_size, 1)):
            ids, mask = self._ids(texts[start:start + batch_size])
            pooled = mean_pool(self.forward(ids, mask).float(), mask)
            out.append(F.normalize(pooled, dim=-1) if normalize_embeddings else pooled)
        return torch.cat(out) if out else torch.empty(0, self.w[
            "embeddings.word_embeddings.weight"].shape[1])
