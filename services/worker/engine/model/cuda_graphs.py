"""Decode steps replayed as CUDA graphs over a ladder of padded batch sizes.

At decode batch sizes a step is a few hundred small kernels, and launching them from
Python costs more than running them (GPU.md: 43 ms of CPU against 14 ms of GPU work at
batch 128). So the whole decode forward (every layer and the LM head) is captured once
at start-up for each batch size of a ladder (1, 2, 4, 8, then steps of 16 up to the
largest), over persistent input buffers; a step copies its inputs into those buffers,
pads the batch to the next captured size and replays one graph.

Padding rows are inert: slot -1 (the KV write skips it) and context length 0 (the
attention kernel writes zeros). Captures share one memory pool, largest first, so the
activations of every size fit in the largest one's. Prefill and mixed steps run eagerly.

Without a CUDA device (``capture=False``) the same padded, static-buffer path runs
eagerly: that is how the tests check it on a CPU.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.worker.engine.input_batch import StepInputs
from services.worker.engine.model.attention import AttentionMetadata, DecodeGroup

log = logging.getLogger(__name__)

# (input_ids [B], positions [B], meta, logits_indices [B]) -> fp32 logits [B, V]
DecodeForward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor],
                         torch.Tensor]
PAD_SLOT = -1  # a padding row's KV slot: written nowhere


def batch_size_ladder(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to ``max_batch_size`` (and itself)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch_size]
    sizes += list(range(16, max_batch_size + 1, 16))
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


@dataclass(frozen=True, slots=True)
class GraphStats:
    batch_sizes: tuple[int, ...]  # captured sizes (empty: no graphs)
    pool_bytes: int  # device memory the captures took (their shared pool)
    capture_s: float  # wall time of all captures at start-up
    num_replays: int  # decode steps served by a graph
    num_padded_rows: int  # rows of padding those replays computed


class DecodeGraphs:
    """The captured graphs and their static buffers; owned by the model runner."""

    def __init__(self, forward: DecodeForward, *, max_batch_size: int,
                 max_blocks_per_seq: int, device: torch.device, capture: bool) -> None:
        self.sizes = batch_size_ladder(max_batch_size)
        self.device = device
        self._forward = forward
        self._capture = capture
        n = self.sizes[-1]
        i64 = torch.int64
        # The static inputs every graph reads; rows beyond a step's batch are padding.
        self.input_ids = torch.zeros(n, dtype=i64, device=device)
        self.positions = torch.zeros(n, dtype=i64, device=device)
        self.slot_mapping = torch.full((n,), PAD_SLOT, dtype=i64, device=device)
        self.block_table = torch.zeros(n, max_blocks_per_seq, dtype=i64, device=device)
        self.ctx_lens = torch.zeros(n, dtype=i64, device=device)
        self.logits_indices = torch.arange(n, dtype=i64, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}  # batch size -> its logits [B, V]
        self._pool_bytes = 0
        self._capture_s = 0.0
        self._num_replays = 0
        self._num_padded_rows = 0

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def _meta(self, b: int) -> AttentionMetadata:
        group = DecodeGroup(token_slice=slice(0, b), block_table=self.block_table[:b],
                            ctx_lens=self.ctx_lens[:b], mask=None)
        return AttentionMetadata(slot_mapping=self.slot_mapping[:b], decode_groups=[group],
                                 prefills=[])

    def _run_static(self, b: int) -> torch.Tensor:
        return self._forward(self.input_ids[:b], self.positions[:b], self._meta(b),
                             self.logits_indices[:b])

    def capture(self) -> None:
        """Capture every size, largest first, into one pool (CUDA only)."""
        if not self._capture:
            return
        t0 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_reserved(self.device)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for b in reversed(self.sizes):
                self._run_static(b)  # warm-up: compile kernels, settle the allocator
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._outputs[b] = self._run_static(b)
                self._graphs[b] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        self._pool_bytes = torch.cuda.memory_reserved(self.device) - before
        self._capture_s = time.perf_counter() - t0
        log.info("captured %d decode graphs (batch %d..%d) in %.1f s, %.0f MiB",
                 len(self.sizes), self.sizes[0], self.sizes[-1], self._capture_s,
                 self._pool_bytes / 2**20)

    def can_run(self, inputs: StepInputs) -> bool:
        return inputs.is_pure_decode and 0 < inputs.num_tokens <= self.max_batch_size \
            and len(inputs.meta.decode_groups) == 1

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Logits [S, V] of a pure decode step, S = len(inputs.logits_indices)."""
        b = inputs.num_tokens
        size = self.sizes[bisect.bisect_left(self.sizes, b)]
        group = inputs.meta.decode_groups[0]
        width = group.block_table.shape[1]
        self.input_ids[:b].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:b].copy_(inputs.positions, non_blocking=True)
        self.slot_mapping[:b].copy_(inputs.meta.slot_mapping, non_blocking=True)
        self.block_table[:b, :width].copy_(group.block_table, non_blocking=True)
        self.ctx_lens[:b].copy_(group.ctx_lens, non_blocking=True)
        if size > b:  # padding rows: no KV write, nothing attended
            self.slot_mapping[b:size].fill_(PAD_SLOT)
            self.ctx_lens[b:size].fill_(0)
        self._num_replays += 1
        self._num_padded_rows += size - b
        graph = self._graphs.get(size)
        if graph is None:  # not captured (no CUDA): the same padded path, eagerly
            logits = self._run_static(size)
        else:
            graph.replay()
            logits = self._outputs[size]
        # Decode rows are in context-length order; logits_indices maps chunks to rows.
        return logits[inputs.logits_indices]

    def stats(self) -> GraphStats:
        return GraphStats(batch_sizes=tuple(sorted(self._graphs)),
                          pool_bytes=self._pool_bytes, capture_s=self._capture_s,
                          num_replays=self._num_replays,
                          num_padded_rows=self._num_padded_rows)
