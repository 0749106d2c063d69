"""What happens to a step's logits before a token is picked, as batched tensor ops.

In order: logit bias, min-tokens (the end and stop tokens banned), the repetition,
presence and frequency penalties, then the grammar's token mask. Each knob costs a few
ops over the rows that use it, whatever the batch's mix; a row that uses none is left
as it is. The host builds flat index lists, one entry per (row, token) the knob
touches, never a loop over the vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from services.worker.engine.request import Request

# bits -> logit offsets: row b of BYTE_TO_OFFSETS is the 8 offsets of byte b, bit j
# (least significant first) giving 0.0 (allowed) or -inf (banned) for its j-th token.
BYTE_TO_OFFSETS = torch.where(
    ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool(), 0.0, -math.inf)
_offset_tables: dict[torch.device, torch.Tensor] = {}  # BYTE_TO_OFFSETS per device


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor. On CUDA through pinned memory and a
    non-blocking copy: ``torch.tensor(..., device=cuda)`` waits for the device (a
    pageable copy synchronizes the stream), which would stall async scheduling. The
    caching host allocator keeps the pinned block until the copy is done."""
    return host_to_device(torch.tensor(values, dtype=dtype), device)


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` (pinned and non-blocking on CUDA, see to_device)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True, slots=True)
class TokenBitmask:
    """The tokens the constrained rows of a step may take (a grammar's next-token mask)."""

    rows: list[int]  # the step's logits rows it applies to, ascending; the other rows are free
    # [len(rows), W] int32 on the host, W = ceil(vocab / 32): bit j of word w allows
    # token 32 w + j. W * 32 may differ from the logits' width (a padded vocabulary):
    # tokens beyond the mask are banned, mask bits beyond the logits ignored.
    bits: torch.Tensor


def process_logits(logits: torch.Tensor, requests: list[Request], *,
                   eos_token_ids: tuple[int, ...] = (),
                   bitmask: TokenBitmask | None = None) -> torch.Tensor:
    """[S, V] raw logits, row i for requests[i] -> [S, V] logits to pick from: a copy
    when any row changes, ``logits`` itself otherwise.

    When min_tokens and a grammar disagree (the grammar allows nothing but the end, and
    the end is still banned), the grammar wins: the row keeps what the grammar allows.
    """
    params = [r.params for r in requests]
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    short = [i for i, r in enumerate(requests)
             if len(r.output_ids) < r.params.min_tokens and _end_ids(r, eos_token_ids)]
    repeated = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    counted = [i for i, p in enumerate(params)
               if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
    if not (biased or short or repeated or counted or bitmask is not None):
        return logits
    device = logits.device
    out = logits.clone()
    if biased:
        entries = [(i, t, b) for i in biased for t, b in params[i].logit_bias]
        out.index_put_((to_device([e[0] for e in entries], torch.int64, device),
                        to_device([e[1] for e in entries], torch.int64, device)),
                       to_device([e[2] for e in entries], torch.float32, device),
                       accumulate=True)
    if short:
        banned = [(i, t) for i in short for t in _end_ids(requests[i], eos_token_ids)]
        ban_tokens(out, to_device([b[0] for b in banned], torch.int64, device),
                   to_device([b[1] for b in banned], torch.int64, device))
    if repeated:
        seen = [sorted(set(requests[i].all_ids)) for i in repeated]
        width = max(len(s) for s in seen)
        # A row's padding repeats its first id: writing that penalized value twice is harmless.
        seen_ids = to_device([s + s[:1] * (width - len(s)) for s in seen], torch.int64, device)
        penalties = to_device([params[i].repetition_penalty for i in repeated], torch.float32,
                              device)
        apply_repetition_penalty(out, to_device(repeated, torch.int64, device), seen_ids,
                                 penalties)
        # A tiny penalty (any > 0 is valid) overflows positive logits to inf, and inf plus
        # a grammar's -inf is NaN, which argmax would pick (the fuzzer's find): keep them
        # finite. -inf (banned) stays.
        out.clamp_(max=torch.finfo(out.dtype).max)
    if counted and any(requests[i].output_ids for i in counted):
        outputs = [requests[i].output_ids for i in counted]
        width = max(len(o) for o in outputs)
        # Padding: token 0 with weight 0, so it counts nothing.
        output_ids = to_device([o + [0] * (width - len(o)) for o in outputs], torch.int64,
                               device)
        weights = to_device([[1.0] * len(o) + [0.0] * (width - len(o)) for o in outputs],
                            torch.float32, device)
        knobs = to_device([[params[i].presence_penalty, params[i].frequency_penalty]
                           for i in counted], torch.float32, device)
        apply_presence_frequency_penalties(out, to_device(counted, torch.int64, device),
                                           output_ids, weights, knobs[:, 0], knobs[:, 1])
    if bitmask is not None:
        offsets = bitmask_offsets(host_to_device(bitmask.bits, device), out.shape[1])
        is_stuck_possible = not set(short).isdisjoint(bitmask.rows)
        if len(bitmask.rows) == len(requests) and not is_stuck_possible:
            return out.add_(offsets)  # every row constrained (rows are in order)
        rows_t = to_device(bitmask.rows, torch.int64, device)
        masked = out.index_select(0, rows_t).add_(offsets)  # [G, V]
        if is_stuck_possible:
            # A row left with no token: min_tokens banned all the grammar allows (the
            # end). It takes the grammar's choice over its raw logits.
            stuck = torch.isneginf(masked.amax(dim=-1, keepdim=True))  # [G, 1]
            masked = torch.where(stuck, logits.index_select(0, rows_t) + offsets, masked)
        out.index_copy_(0, rows_t, masked)
    return out


def _end_ids(req: Request, eos_token_ids: tuple[int, ...]) -> list[int]:
    """The tokens that would end ``req``: its stop tokens, and the model's end tokens
    unless it ignores them."""
    ends = list(req.params.stop_token_ids)
    if not req.params.ignore_eos:
        ends += [t for t in eos_token_ids if t not in ends]
    return ends


def ban_tokens(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor) -> None:
    """In place: logits[rows[k], token_ids[k]] = -inf for every k."""
    logits.index_put_((rows, token_ids), torch.tensor(-math.inf, device=logits.device))


def apply_repetition_penalty(logits: torch.Tensor, rows: torch.Tensor, seen_ids: torch.Tensor,
                             penalties: torch.Tensor) -> None:
    """In place, as in the CTRL paper / HF: divide positive logits, multiply negative.

    logits: [S, V]; rows: [P] the penalized rows; seen_ids: [P, L] each row's seen ids
    (an id may repeat); penalties: [P].
    """
    index = (rows.unsqueeze(1), seen_ids)
    seen = logits[index]  # [P, L]
    penalty = penalties.unsqueeze(1).to(logits.dtype)
    logits[index] = torch.where(seen > 0, seen / penalty, seen * penalty)


def apply_presence_frequency_penalties(logits: torch.Tensor, rows: torch.Tensor,
                                       output_ids: torch.Tensor, weights: torch.Tensor,
                                       presence: torch.Tensor, frequency: torch.Tensor
                                       ) -> None:
    """In place, OpenAI's definition: logit_j -= frequency * c_j + presence * (c_j > 0),
    c_j the number of times token j was generated.

    logits: [S, V]; rows: [P]; output_ids: [P, L] each row's generated ids, padded;
    weights: [P, L] fp32, 1 for a real id and 0 for padding; presence, frequency: [P].
    """
    counts = torch.zeros((rows.shape[0], logits.shape[1]), dtype=logits.dtype,
                         device=logits.device).scatter_add_(1, output_ids, weights)  # [P, V]
    penalty = frequency.unsqueeze(1) * counts + presence.unsqueeze(1) * (counts > 0)
    logits.index_add_(0, rows, penalty.neg_())


def bitmask_offsets(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[G, W] int32 token bitmask -> [G, vocab_size] fp32 offsets: 0 where the token is
    allowed, -inf where it is not (and for every token past the mask's W * 32).

    One table lookup per byte of the mask (on a little-endian host, as x86 and ARM are,
    byte k of word w holds the bits of tokens 32 w + 8 k ..), so the cost is a gather
    of the mask's bytes, no Python per token or per row.
    """
    num_rows = bits.shape[0]
    table = _offset_tables.get(bits.device)
    if table is None:
        table = _offset_tables[bits.device] = BYTE_TO_OFFSETS.to(bits.device)
    offsets = torch.nn.functional.embedding(bits.contiguous().view(torch.uint8).long(), table)
    offsets = offsets.view(num_rows, -1)  # [G, W * 32]
    if offsets.shape[1] >= vocab_size:
        return offsets[:, :vocab_size]
    return torch.nn.functional.pad(offsets, (0, vocab_size - offsets.shape[1]),
                                   value=-math.inf)
