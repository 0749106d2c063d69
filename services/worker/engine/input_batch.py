"""A step's model inputs, built with vector ops from a persistent batch.

Every running request keeps a row of ``block_table`` for as long as it holds blocks; a
step only appends the blocks it allocated since the last step (block tables only grow
while a request runs; a preempted or finished request's row is released and zeroed).
Positions and slot mappings are then computed for all of a step's tokens at once with
numpy, not token by token in Python; the only per-request Python left is reading each
chunk's fields and slicing its token ids.

On CUDA the host arrays go through pinned staging buffers and one non-blocking copy
each, so preparing a step never waits for the device. Two staging buffers alternate by
step: with at most one step in flight, a buffer's copies are done before it comes round
again (see ``_Stager``).

The row order of a step is: decodes first (one query each), sorted by context length
so that groups pad little, then prefill chunks in scheduling order. The logits rows
follow the order of the scheduled chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from services.worker.engine.model.attention import (
    AttentionMetadata,
    DecodeGroup,
    PrefillBatch,
    PrefillChunk,
)
from services.worker.engine.scheduler import ScheduledChunk

MAX_DECODE_GROUPS = 4  # decode batches split by context length to bound padding
MIN_DECODE_GROUP = 8  # smallest group worth its own attention call


def split_decode_groups(n: int, *, max_groups: int = MAX_DECODE_GROUPS) -> list[int]:
    """Sizes of the groups that ``n`` decodes, sorted by context length, are cut into."""
    num_groups = max(1, min(max_groups, n // MIN_DECODE_GROUP))
    base, extra = divmod(n, num_groups)
    return [base + (1 if i < extra else 0) for i in range(num_groups)]


@dataclass(slots=True)
class PendingTokens:
    """Tokens the step in flight sampled, not yet read back (async scheduling). Their
    requests hold a placeholder as their last token; a chunk that reaches it takes the
    real id from the device instead."""

    token_ids: torch.Tensor  # [S] int64 on the device
    index: dict[str, int]  # request id -> its row of token_ids


@dataclass(slots=True)
class StepInputs:
    """Everything the model's forward takes for one step (tensors on the device)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int64: rows whose logits are sampled, chunk order
    num_decodes: int  # the first num_decodes rows are decodes, one token each

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def is_pure_decode(self) -> bool:
        return self.num_decodes == self.num_tokens


@dataclass(slots=True)
class _Units:
    """A step's chunks cut into the units the batch is laid out in: a chunk is one unit,
    except that a chunk whose drafts are verified is one single-token unit per token, so
    that each is a decode row of its own (see ``prepare``)."""

    chunk_of: list[int]  # the chunk each unit belongs to
    starts: list[int]  # its first position
    lens: list[int]  # its tokens
    token_ids: list[list[int]]
    wants_logits: list[bool]  # its last row's logits are sampled
    has_split_drafts: bool


def _units(chunks: Sequence[ScheduledChunk], *, split_drafts: bool,
           split_short: int = 0) -> _Units:
    """Speculative verification lays each token of a chunk with drafts out as a decode
    row of its own (context: the positions up to it, all written to the cache before
    attention runs): causal attention over the drafts without a mask, and every row
    computed as a plain one-token decode at that position computes it, so verification
    sees the logits plain decoding would (see AttentionMetadata.row_exact)."""
    units = _Units([], [], [], [], [], False)
    for i, c in enumerate(chunks):
        ids = c.token_ids()
        verify = bool(c.spec_ids) and split_drafts
        if verify or (c.start > 0 and 1 < len(ids) <= split_short):
            units.has_split_drafts = True
            wants_last = c.completes_sequence or bool(c.spec_ids)
            for j, token in enumerate(ids):
                units.chunk_of.append(i)
                units.starts.append(c.start + j)
                units.lens.append(1)
                units.token_ids.append([token])
                # Verifying: logits from the last known token on, each checking the
                # draft after it; else after the last token only.
                units.wants_logits.append(j >= c.num_tokens - 1 if verify
                                          else wants_last and j == len(ids) - 1)
            continue
        units.chunk_of.append(i)
        units.starts.append(c.start)
        units.lens.append(len(ids))
        units.token_ids.append(ids)
        # Drafts not verified: a draft model continuing its proposal from the last one.
        units.wants_logits.append(c.completes_sequence or bool(c.spec_ids))
    return units


class InputBatch:
    """The persistent per-request rows and the staging buffers of step inputs."""

    def __init__(self, *, max_num_seqs: int, max_blocks_per_seq: int, max_num_tokens: int,
                 block_size: int, device: torch.device, decode_kernel: bool,
                 varlen_prefill: bool) -> None:
        """``decode_kernel``: decodes read blocks in place (one group, no masks);
        ``varlen_prefill``: prefills go to one varlen kernel call (a ``PrefillBatch``)
        instead of one SDPA call per chunk."""
        self.block_size = block_size
        self.device = device
        self.decode_kernel = decode_kernel
        self.varlen_prefill = varlen_prefill
        # Rows are released before a step is prepared, so max_num_seqs would do; a few
        # spares cost nothing and keep a bookkeeping slip from failing a step.
        num_rows = max_num_seqs + 8
        self.block_table = np.zeros((num_rows, max_blocks_per_seq), dtype=np.int64)
        self._num_blocks = np.zeros(num_rows, dtype=np.int64)  # entries filled per row
        self._row_of: dict[str, int] = {}  # request id -> its row
        self._free_rows = list(range(num_rows - 1, -1, -1))
        capacity = 4 * (max_num_tokens + num_rows) + 2 * num_rows * (max_blocks_per_seq + 2)
        self._stager = _Stager(device, capacity=capacity)

    # -- rows ------------------------------------------------------------------------

    def release(self, request_id: str) -> None:
        """Forget a request that finished or was preempted (its blocks were freed)."""
        row = self._row_of.pop(request_id, None)
        if row is None:
            return
        self.block_table[row, : self._num_blocks[row]] = 0
        self._num_blocks[row] = 0
        self._free_rows.append(row)

    def _sync_rows(self, chunks: Sequence[ScheduledChunk],
                   tables: Sequence[list[int]]) -> np.ndarray:
        """Each chunk's row, its block-table row extended by the blocks it gained."""
        rows = np.empty(len(chunks), dtype=np.int64)
        for i, (chunk, table) in enumerate(zip(chunks, tables, strict=True)):
            rid = chunk.request.request_id
            row = self._row_of.get(rid)
            if row is None:
                row = self._free_rows.pop()
                self._row_of[rid] = row
            have = int(self._num_blocks[row])
            if len(table) > have:
                self.block_table[row, have:len(table)] = table[have:]
                self._num_blocks[row] = len(table)
            rows[i] = row
        return rows

    # -- one step --------------------------------------------------------------------

    def prepare(self, chunks: Sequence[ScheduledChunk], tables: Sequence[list[int]],
                pending: PendingTokens | None = None, *,
                verify_drafts: bool = True, split_short: int = 0) -> StepInputs:
        """The step's inputs. A chunk with drafts gets logits for every one of its
        tokens when ``verify_drafts`` (the target model checks each draft), else for its
        last only (a draft model continuing its own proposal). A chunk of 2 to
        ``split_short`` tokens after the first position is laid out as decode rows too
        (a draft model catching up on a step's tokens takes the decode kernels)."""
        bs = self.block_size
        self._stager.reset()
        rows = self._sync_rows(chunks, tables)
        units = _units(chunks, split_drafts=verify_drafts, split_short=split_short)
        n = len(units.starts)
        starts = np.asarray(units.starts, dtype=np.int64)
        lens = np.asarray(units.lens, dtype=np.int64)
        wants = np.asarray(units.wants_logits, dtype=bool)
        unit_rows = rows[np.asarray(units.chunk_of, dtype=np.int64)]

        is_decode = (lens == 1) & (starts > 0)
        decodes = np.flatnonzero(is_decode)
        decodes = decodes[np.argsort(starts[decodes], kind="stable")]
        order = np.concatenate([decodes, np.flatnonzero(~is_decode)])
        num_decodes = len(decodes)

        o_starts, o_lens, o_rows = starts[order], lens[order], unit_rows[order]
        ends = np.cumsum(o_lens)  # [n]: one past each unit's last row
        num_tokens = int(ends[-1])
        firsts = ends - o_lens
        # Position of every token: its unit's start plus its offset within the unit.
        positions = np.arange(num_tokens) + np.repeat(o_starts - firsts, o_lens)
        token_rows = np.repeat(o_rows, o_lens)
        slots = self.block_table[token_rows, positions // bs] * bs + positions % bs

        input_ids: list[int] = []
        fix_rows: list[int] = []  # rows holding a placeholder, and where its id is
        fix_from: list[int] = []
        for u in order.tolist():
            input_ids.extend(units.token_ids[u])
            c = chunks[units.chunk_of[u]]
            # has_placeholder: not a new request that reuses an id of one in flight.
            if (pending is not None and c.completes_sequence and c.request.has_placeholder
                    and not c.spec_ids):
                j = pending.index.get(c.request.request_id)
                if j is not None:
                    fix_rows.append(len(input_ids) - 1)
                    fix_from.append(j)

        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
        logits_rows = (ends - 1)[rank[wants]]

        meta = AttentionMetadata(
            slot_mapping=self._stager.put(slots),
            decode_groups=self._decode_groups(o_starts[:num_decodes], o_rows[:num_decodes]),
            prefills=[],
            row_exact=units.has_split_drafts,
        )
        prefill_order = range(num_decodes, n)
        if self.varlen_prefill and num_decodes < n:
            meta.prefill_batch = self._prefill_batch(o_starts[num_decodes:],
                                                     o_lens[num_decodes:],
                                                     o_rows[num_decodes:],
                                                     first_row=int(firsts[num_decodes]))
        else:
            meta.prefills = [self._prefill_chunk(int(firsts[k]), int(o_starts[k]),
                                                 int(o_lens[k]), int(o_rows[k]))
                             for k in prefill_order]
        ids = self._stager.put(np.asarray(input_ids, dtype=np.int64))
        if fix_rows:
            assert pending is not None
            rows_t = self._stager.put(np.asarray(fix_rows, dtype=np.int64))
            from_t = self._stager.put(np.asarray(fix_from, dtype=np.int64))
            ids.index_copy_(0, rows_t, pending.token_ids.index_select(0, from_t))
        return StepInputs(
            input_ids=ids,
            positions=self._stager.put(positions),
            meta=meta,
            logits_indices=self._stager.put(logits_rows),
            num_decodes=num_decodes,
        )

    def _table_rows(self, rows: np.ndarray, num_blocks: int) -> torch.Tensor:
        """Rows of the block table cut to ``num_blocks`` columns: [len(rows), num_blocks]."""
        return self._stager.put(self.block_table[rows, :num_blocks])

    def _decode_groups(self, starts: np.ndarray, rows: np.ndarray) -> list[DecodeGroup]:
        if not len(starts):
            return []
        max_groups = 1 if self.decode_kernel else MAX_DECODE_GROUPS
        groups = []
        first = 0
        for size in split_decode_groups(len(starts), max_groups=max_groups):
            ctx = starts[first:first + size] + 1
            max_blocks = -(-int(ctx.max()) // self.block_size)
            lens = torch.from_numpy(ctx)
            mask = None
            if not self.decode_kernel:
                span = torch.arange(max_blocks * self.block_size)
                mask = (span.unsqueeze(0) < lens.unsqueeze(1)).view(size, 1, 1, -1)
                mask = mask.to(self.device)
            groups.append(DecodeGroup(
                token_slice=slice(first, first + size),
                block_table=self._table_rows(rows[first:first + size], max_blocks),
                ctx_lens=self._stager.put(ctx),
                mask=mask,
            ))
            first += size
        return groups

    def _prefill_chunk(self, first: int, start: int, num_tokens: int, row: int) -> PrefillChunk:
        token_slice = slice(first, first + num_tokens)
        if start == 0:
            return PrefillChunk(token_slice=token_slice, start=0, block_ids=None, mask=None)
        ctx = start + num_tokens
        num_blocks = -(-ctx // self.block_size)
        q_pos = torch.arange(start, ctx).unsqueeze(1)
        mask = torch.arange(ctx).unsqueeze(0) <= q_pos  # [n, ctx]
        return PrefillChunk(
            token_slice=token_slice,
            start=start,
            block_ids=self._stager.put(self.block_table[row, :num_blocks]),
            mask=mask.to(self.device),
        )

    def _prefill_batch(self, starts: np.ndarray, lens: np.ndarray, rows: np.ndarray, *,
                       first_row: int) -> PrefillBatch:
        ctx = starts + lens
        max_blocks = -(-int(ctx.max()) // self.block_size)
        cu_seqlens = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=cu_seqlens[1:])
        return PrefillBatch(
            token_slice=slice(first_row, first_row + int(cu_seqlens[-1])),
            block_table=self._table_rows(rows, max_blocks),
            cu_seqlens_q=self._stager.put(cu_seqlens),
            ctx_lens=self._stager.put(ctx),
            max_query_len=int(lens.max()),
        )


class _Stager:
    """Host int64 arrays to the device. On CUDA each goes through its own region of a
    pinned buffer and a non-blocking copy: a pageable copy would make the host wait for
    the device. Two buffers alternate by step: with one step in flight (async
    scheduling), a step's copies are done by the time its buffer comes round again,
    because the step before it was read back in between. On the CPU the array itself is
    returned as a tensor."""

    def __init__(self, device: torch.device, *, capacity: int) -> None:
        self.device = device
        self._pinned = device.type == "cuda"
        self._buffers = [torch.empty(capacity if self._pinned else 0, dtype=torch.int64,
                                     pin_memory=self._pinned) for _ in range(2)]
        self._buffer = self._buffers[0]
        self._step = 0
        self._cursor = 0

    def reset(self) -> None:
        """Start a step: its arrays go to the other buffer."""
        self._step += 1
        self._buffer = self._buffers[self._step % 2]
        self._cursor = 0

    def put(self, values: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
        if not self._pinned:
            return host.to(self.device)
        n = host.numel()
        if self._cursor + n > self._buffer.numel():  # never expected: sized for a step
            return host.pin_memory().to(self.device, non_blocking=True)
        staged = self._buffer[self._cursor:self._cursor + n].view(host.shape)
        self._cursor += n
        staged.copy_(host)
        return staged.to(self.device, non_blocking=True)
