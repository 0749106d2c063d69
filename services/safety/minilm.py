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
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer


@dataclass(frozen=True, slots=True)
class Layout:
    """Packed rows' real tokens: their states travel as [T, H] (no padding: a layer's
    linear parts, most of its cost, run on the real tokens only) and are laid out in the
    rows only for attention."""

    slots: torch.Tensor  # [T] each real token's place among the rows' R * C, ascending
    rows: int  # R
    width: int  # C
    attention: torch.Tensor  # [R, 1, C, C] what each slot may attend to (Packed.attention)


def bert_layer(x: torch.Tensor, mask: torch.Tensor | Layout, w: Mapping[str, torch.Tensor],
               *, num_heads: int, eps: float, dropout: float = 0.0) -> torch.Tensor:
    """One BERT encoder layer (post-norm, GELU) over token states ``x`` [B, L, H], attending
    to the real tokens ``mask`` [B, L] (or, for packed rows, what each token may attend to:
    [B, 1, L, L], ``Packed.attention``); or over the real tokens of packed rows ``x``
    [T, H] laid out by ``mask``, a ``Layout``. ``w`` holds the layer's tensors by their
    names in the checkpoint after ``encoder.layer.<i>.``. ``dropout`` > 0 only while
    training."""
    hidden = x.shape[-1]
    d = hidden // num_heads
    if isinstance(mask, Layout):
        b, length, slots = mask.rows, mask.width, mask.slots
        attn_mask = mask.attention
    else:
        b, length = x.shape[0], x.shape[1]
        attn_mask = mask if mask.dim() == 4 else mask[:, None, None, :]

    def linear(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(t, w[f"{name}.weight"], w[f"{name}.bias"])

    def norm(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, t.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps)

    def split(t: torch.Tensor) -> torch.Tensor:
        if isinstance(mask, Layout):  # into the rows; a padding slot is zeros
            t = t.new_zeros(b * length, hidden).index_copy_(0, slots, t)
        return t.view(b, length, num_heads, d).transpose(1, 2)

    q = split(linear(x, "attention.self.query"))
    k = split(linear(x, "attention.self.key"))
    v = split(linear(x, "attention.self.value"))
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                       scale=1 / math.sqrt(d))
    a = a.transpose(1, 2).reshape(b * length, hidden)
    a = a.index_select(0, slots) if isinstance(mask, Layout) else a.view(b, length, hidden)
    a = F.dropout(linear(a, "attention.output.dense"), dropout, dropout > 0)
    x = norm(x + a, "attention.output.LayerNorm")
    h = F.dropout(linear(F.gelu(linear(x, "intermediate.dense")), "output.dense"), dropout,
                  dropout > 0)
    return norm(x + h, "output.LayerNorm")


@dataclass(frozen=True, slots=True)
class Packed:
    """Texts packed end to end into rows of tokens, each text attending only to itself:
    a batch of short and long texts costs its real tokens, not its longest text times its
    size (padding), in one call per layer."""

    ids: torch.Tensor  # [R, C] token ids (0 past a row's texts)
    positions: torch.Tensor  # [R, C] each token's position in its own text
    # [R, 1, C, C] what each token may attend to: the tokens of its own text (a padding
    # token: itself)
    attention: torch.Tensor
    owner: torch.Tensor  # [R * C] the text each token belongs to; -1 for padding
    num_texts: int
    uncut: torch.Tensor  # [num_texts] bool: the text was not cut at the token limit

    @property
    def layout(self) -> Layout:
        """The real tokens' layout: states of those only ([T, H], ``bert_layer``)."""
        rows, width = self.ids.shape
        return Layout(torch.nonzero(self.owner >= 0).flatten(), rows, width, self.attention)

    def pool(self, states: torch.Tensor) -> torch.Tensor:
        """Each text's mean token state [num_texts, H] (float32), from ``states`` [R, C, H]
        or the real tokens' [T, H] (``layout``)."""
        real = self.owner >= 0
        owner = self.owner[real]
        flat = states.float() if states.dim() == 2 else (
            states.reshape(-1, states.shape[-1]).float()[real])
        sums = torch.zeros(self.num_texts, flat.shape[1], device=flat.device).index_add_(
            0, owner, flat)
        counts = torch.zeros(self.num_texts, device=flat.device).index_add_(
            0, owner, torch.ones(len(owner), device=flat.device))
        return sums / counts.clamp_min(1.0)[:, None]


def pack(rows_of_ids: Sequence[Sequence[int]], *, row_tokens: int) -> Packed:
    """``rows_of_ids`` (each text's token ids) packed into rows of at most ``row_tokens``
    tokens (a longer text: a row of its own), longest first, each into the first row with
    room; the rows are as wide as the fullest, padded past their texts."""
    order = sorted(range(len(rows_of_ids)), key=lambda i: -len(rows_of_ids[i]))
    fill: list[int] = []
    placed: list[tuple[int, int]] = [(0, 0)] * len(rows_of_ids)  # (row, start)
    for i in order:
        n = len(rows_of_ids[i])
        row = next((r for r, used in enumerate(fill) if used + n <= row_tokens), len(fill))
        if row == len(fill):
            fill.append(0)
        placed[i] = (row, fill[row])
        fill[row] += n
    width = max(fill, default=0) or 1
    ids = torch.zeros(len(fill), width, dtype=torch.int64)
    positions = torch.zeros(len(fill), width, dtype=torch.int64)
    segment = torch.full((len(fill), width), -1, dtype=torch.int64)
    for i, (row, start) in enumerate(placed):
        n = len(rows_of_ids[i])
        ids[row, start:start + n] = torch.tensor(rows_of_ids[i], dtype=torch.int64)
        positions[row, start:start + n] = torch.arange(n)
        segment[row, start:start + n] = i
    allowed = segment[:, :, None] == segment[:, None, :]
    allowed &= (segment >= 0)[:, :, None] | torch.eye(width, dtype=torch.bool)
    return Packed(ids, positions, allowed[:, None], segment.reshape(-1), len(rows_of_ids),
                  torch.ones(len(rows_of_ids), dtype=torch.bool))


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

    def token_ids(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Each text's token ids, cut to ``max_seq_length`` (keeping [SEP] last), and
        whether it was left whole."""
        encodings = self.tokenizer.encode_batch(list(texts))
        rows = [e.ids[:self.max_seq_length - 1] + e.ids[-1:] if len(e.ids) > self.max_seq_length
                else e.ids for e in encodings]
        return rows, [len(e.ids) < self.max_seq_length for e in encodings]

    def pack(self, texts: Sequence[str], *, row_tokens: int = 128) -> Packed:
        """``texts`` tokenized (each cut at ``max_seq_length``) and packed (``pack``) into
        rows of ``row_tokens``."""
        rows, uncut = self.token_ids(texts)
        packed = pack(rows, row_tokens=row_tokens)
        return replace(packed, uncut=torch.tensor(uncut, dtype=torch.bool))

    @torch.inference_mode()
    def forward_packed(self, packed: Packed, *, stop: int | None = None,
                       layout: Layout | None = None) -> torch.Tensor:
        """The real tokens' states [T, H] of ``packed`` (``packed.layout``, or ``layout``
        when the caller has it) after the embeddings and layers ``0..stop-1`` (all by
        default)."""
        layout = packed.layout if layout is None else layout
        ids = packed.ids.flatten()[layout.slots]
        positions = packed.positions.flatten()[layout.slots]
        x = (F.embedding(ids, self.w["embeddings.word_embeddings.weight"])
             + F.embedding(positions, self.w["embeddings.position_embeddings.weight"])
             + self.w["embeddings.token_type_embeddings.weight"][0])
        x = self._norm(x, "embeddings.LayerNorm")
        return self.run_layers(x, layout, start=0,
                               stop=self.num_layers if stop is None else stop)

    def _ids(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, L] (padded with 0) and the mask of real tokens [B, L]."""
        rows, _ = self.token_ids(texts)
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
    def run_layers(self, x: torch.Tensor, mask: torch.Tensor | Layout, *, start: int,
                   stop: int) -> torch.Tensor:
        """Token states after layers ``start..stop-1``, from ``x`` [B, L, H] (or [T, H]
        with a ``Layout``: ``bert_layer``)."""
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
