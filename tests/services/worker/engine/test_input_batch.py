"""The persistent batch's step inputs against the per-token reference they replaced."""

from __future__ import annotations

import random

import pytest
import torch

from services.worker.engine.input_batch import InputBatch, StepInputs, split_decode_groups
from services.worker.engine.params import SamplingParams
from services.worker.engine.request import Request
from services.worker.engine.scheduler import ScheduledChunk

BS = 4  # tokens per block
CPU = torch.device("cpu")


def reference(chunks: list[ScheduledChunk], tables: list[list[int]], *,
              decode_kernel: bool) -> dict[str, object]:
    """The step inputs as the model runner built them before the persistent batch:
    token by token in Python (kept here as the specification)."""
    decode_idx = [i for i, c in enumerate(chunks) if c.num_tokens == 1 and c.start > 0]
    decode_set = set(decode_idx)
    decode_idx.sort(key=lambda i: chunks[i].start)
    order = decode_idx + [i for i in range(len(chunks)) if i not in decode_set]
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    last_row: dict[int, int] = {}
    prefills = []
    for i in order:
        c, table = chunks[i], tables[i]
        row = len(input_ids)
        end = c.start + c.num_tokens
        input_ids.extend(c.request.all_ids[c.start:end])
        positions.extend(range(c.start, end))
        slots.extend(table[p // BS] * BS + p % BS for p in range(c.start, end))
        last_row[i] = len(input_ids) - 1
        if i not in decode_set:
            if c.start == 0:
                prefills.append((slice(row, row + c.num_tokens), 0, None, None))
            else:
                ctx = c.start + c.num_tokens
                mask = torch.arange(ctx).unsqueeze(0) <= torch.arange(c.start, ctx).unsqueeze(1)
                prefills.append((slice(row, row + c.num_tokens), c.start,
                                 table[:-(-ctx // BS)], mask))
    groups = []
    row = 0
    sizes = split_decode_groups(len(decode_idx), max_groups=1 if decode_kernel else 4) \
        if decode_idx else []
    for size in sizes:
        members = decode_idx[row:row + size]
        ctx_lens = [chunks[i].start + 1 for i in members]
        width = -(-max(ctx_lens) // BS)
        padded = [tables[i][:width] + [0] * (width - len(tables[i][:width])) for i in members]
        mask = None
        if not decode_kernel:
            lens = torch.tensor(ctx_lens)
            mask = (torch.arange(width * BS).unsqueeze(0) < lens.unsqueeze(1)).view(
                size, 1, 1, -1)
        groups.append((slice(row, row + size), padded, ctx_lens, mask))
        row += size
    return {
        "input_ids": input_ids, "positions": positions, "slots": slots,
        "logits": [last_row[i] for i, c in enumerate(chunks) if c.completes_sequence],
        "groups": groups, "prefills": prefills,
    }


def assert_same(got: StepInputs, want: dict[str, object]) -> None:
    assert got.input_ids.tolist() == want["input_ids"]
    assert got.positions.tolist() == want["positions"]
    assert got.meta.slot_mapping.tolist() == want["slots"]
    assert got.logits_indices.tolist() == want["logits"]
    groups = want["groups"]
    assert isinstance(groups, list) and len(got.meta.decode_groups) == len(groups)
    for g, (token_slice, table, ctx_lens, mask) in zip(got.meta.decode_groups, groups,
                                                       strict=True):
        assert g.token_slice == token_slice
        assert g.block_table.tolist() == table
        assert g.ctx_lens.tolist() == ctx_lens
        assert (g.mask is None) == (mask is None)
        if mask is not None:
            assert torch.equal(g.mask, mask)
    prefills = want["prefills"]
    assert isinstance(prefills, list) and len(got.meta.prefills) == len(prefills)
    for p, (token_slice, start, block_ids, mask) in zip(got.meta.prefills, prefills,
                                                        strict=True):
        assert (p.token_slice, p.start) == (token_slice, start)
        assert (p.block_ids is None) == (block_ids is None)
        if block_ids is not None:
            assert p.block_ids.tolist() == block_ids
            assert torch.equal(p.mask, mask)
    assert got.num_decodes == sum(g.token_slice.stop - g.token_slice.start
                                  for g in got.meta.decode_groups)


class Pool:
    """Requests with block tables drawn from a shuffled pool, as the block manager would."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.free = list(range(500))
        self.rng.shuffle(self.free)
        self.tables: dict[str, list[int]] = {}

    def request(self, rid: str, num_tokens: int) -> Request:
        req = Request(request_id=rid, prompt_ids=[self.rng.randrange(1000)
                                                  for _ in range(num_tokens)],
                      params=SamplingParams())
        self.tables[rid] = []
        return req

    def chunk(self, req: Request, start: int, num_tokens: int) -> ScheduledChunk:
        table = self.tables[req.request_id]
        while len(table) * BS < start + num_tokens:
            table.append(self.free.pop())
        return ScheduledChunk(req, start, num_tokens)

    def drop(self, rid: str) -> None:
        self.free.extend(self.tables.pop(rid))


def batch(*, decode_kernel: bool = False, varlen_prefill: bool = False) -> InputBatch:
    return InputBatch(max_num_seqs=64, max_blocks_per_seq=200, max_num_tokens=2048,
                      block_size=BS, device=CPU, decode_kernel=decode_kernel,
                      varlen_prefill=varlen_prefill)


def random_step(pool: Pool, rng: random.Random, step: int) -> list[ScheduledChunk]:
    """A mix of decodes, fresh prefills, continued prefill chunks, done or not."""
    chunks = []
    for j in range(rng.randrange(1, 40)):
        n = rng.randrange(2, 90)
        req = pool.request(f"s{step}-{j}", n)
        kind = rng.choice(["decode", "fresh", "fresh-part", "continue", "continue-part"])
        if kind == "decode":
            req.num_computed_tokens = n - 1
            chunks.append(pool.chunk(req, n - 1, 1))
        elif kind.startswith("fresh"):
            chunks.append(pool.chunk(req, 0, n if kind == "fresh" else rng.randrange(1, n)))
        else:
            start = rng.randrange(1, n)
            end = n if kind == "continue" else rng.randrange(start + 1, n + 1)
            chunks.append(pool.chunk(req, start, end - start))
    return chunks


@pytest.mark.parametrize("decode_kernel", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_random_steps_give_the_reference_inputs(seed, decode_kernel):
    rng = random.Random(seed)
    pool = Pool(seed)
    inputs = batch(decode_kernel=decode_kernel)
    for step in range(4):
        chunks = random_step(pool, rng, step)
        tables = [pool.tables[c.request.request_id] for c in chunks]
        assert_same(inputs.prepare(chunks, tables),
                    reference(chunks, tables, decode_kernel=decode_kernel))
        for c in chunks:  # every request leaves: rows and tables are recycled
            inputs.release(c.request.request_id)
            pool.drop(c.request.request_id)


def test_rows_persist_and_grow_across_steps_and_are_reset_on_release():
    pool = Pool(1)
    inputs = batch()
    a, b = pool.request("a", 7), pool.request("b", 3)
    steps = [[pool.chunk(a, 0, 7), pool.chunk(b, 0, 3)]]
    a.append_output(11)
    b.append_output(12)
    steps.append([pool.chunk(a, 7, 1), pool.chunk(b, 3, 1)])  # a's 8th token: a new block
    for chunks in steps:
        tables = [pool.tables[c.request.request_id] for c in chunks]
        assert_same(inputs.prepare(chunks, tables), reference(chunks, tables,
                                                              decode_kernel=False))
    row_a = inputs._row_of["a"]
    assert inputs.block_table[row_a, :3].tolist() == pool.tables["a"] + [0]
    # Preempted: its blocks go back and it is readmitted with other blocks.
    inputs.release("a")
    pool.drop("a")
    assert inputs.block_table[row_a].tolist() == [0] * 200
    pool.free.reverse()
    pool.tables["a"] = []
    chunks = [pool.chunk(a, 0, 8), pool.chunk(b, 4, 1)]  # all 8 of its tokens again
    b.append_output(13)
    chunks[1] = pool.chunk(b, 4, 1)
    tables = [pool.tables[c.request.request_id] for c in chunks]
    assert_same(inputs.prepare(chunks, tables), reference(chunks, tables, decode_kernel=False))


def test_varlen_prefills_are_one_batch_over_the_persistent_rows():
    pool = Pool(2)
    inputs = batch(decode_kernel=True, varlen_prefill=True)
    d, f, c = pool.request("d", 10), pool.request("f", 5), pool.request("c", 30)
    chunks = [pool.chunk(f, 0, 5), pool.chunk(d, 9, 1), pool.chunk(c, 13, 10)]
    tables = [pool.tables[x.request.request_id] for x in chunks]
    got = inputs.prepare(chunks, tables)
    want = reference(chunks, tables, decode_kernel=True)
    assert got.input_ids.tolist() == want["input_ids"]
    assert got.meta.slot_mapping.tolist() == want["slots"]
    assert got.logits_indices.tolist() == [5, 0]  # f's last row, then d's (c goes on)
    assert got.meta.prefills == []
    b = got.meta.prefill_batch
    assert b is not None
    assert b.token_slice == slice(1, 16)  # after the one decode: f (5 rows), c (10 rows)
    assert b.cu_seqlens_q.tolist() == [0, 5, 15]
    assert b.ctx_lens.tolist() == [5, 23]
    assert b.max_query_len == 10
    assert b.block_table.tolist() == [pool.tables["f"] + [0] * 4, pool.tables["c"][:6]]
    assert got.num_decodes == 1 and not got.is_pure_decode
