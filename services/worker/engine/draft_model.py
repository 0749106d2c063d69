"""A draft model that proposes speculative tokens: a smaller (or quantized) model sharing
the target's tokenizer runs ``k`` greedy decode steps per verification step.

The draft keeps its own KV cache tensors but addresses them with the target's block
ids: a request's blocks (reserved by the scheduler for its decode and its drafts) hold
both models' keys and values for the same positions, so the draft needs no allocator
of its own and its slots come and go with the target's. A block the target took from
the prefix cache may hold no draft KV (the request that filled it may not have run the
draft), so the draft computes each request from its first token, once; after that it
only catches up on what the target accepted since its last proposal.

Drafts are the draft model's argmax: a point-mass proposal, which the sampler's
rejection sampling turns into the target's distribution exactly (sampler.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.config import EngineConfig
from services.worker.engine.model.config import ModelConfig
from services.worker.engine.model_runner import ModelRunner, resolve_model_config
from services.worker.engine.request import Request
from services.worker.engine.scheduler import ScheduledChunk

# A draft step feeding up to this many tokens of a request (the last draft and the bonus
# token after a fully accepted step) lays them out as decode rows: the decode kernels.
CATCH_UP_ROWS = 4


@dataclass(slots=True)
class _DraftState:
    num_computed: int  # leading tokens of the request whose draft KV is valid
    tail: list[int]  # the drafts it computed KV for, after num_computed (unverified)


class DraftModelProposer:
    has_model = True

    def __init__(self, config: EngineConfig, target_cfg: ModelConfig, blocks: BlockManager,
                 *, max_model_len: int) -> None:
        draft_config = draft_engine_config(config)
        draft_cfg = resolve_model_config(draft_config)
        if draft_cfg.vocab_size != target_cfg.vocab_size:
            raise ValueError(
                f"the draft model {config.speculative_draft_model!r} has a vocabulary of "
                f"{draft_cfg.vocab_size} tokens and the model {target_cfg.vocab_size}: a "
                "draft must share the model's tokenizer")
        self.runner = ModelRunner(draft_config, draft_cfg, num_blocks=blocks.num_blocks,
                                  max_model_len=max_model_len)
        self.blocks = blocks
        self.max_drafts = config.num_speculative_tokens
        self._states: dict[str, _DraftState] = {}
        # Forward passes of a token or two a request (a draft step) and their seconds:
        # the cost model's measure of a draft (speculative.py).
        self.num_forwards = 0
        self.decode_seconds = 0.0

    def kind(self, req: Request) -> str:
        """Each request's drafts are judged by its own past acceptance."""
        return req.request_id

    def available(self, req: Request) -> int:
        return self.max_drafts

    def release(self, request_id: str) -> None:
        self._states.pop(request_id, None)
        self.runner.release(request_id)

    def _catch_up_start(self, chunk: ScheduledChunk) -> int:
        """Where the draft's next forward starts: its valid KV extended by the drafts
        of the last proposal that the target accepted."""
        req = chunk.request
        state = self._states.get(req.request_id)
        if state is None:
            return 0
        start = state.num_computed
        for token in state.tail:
            if start >= req.num_tokens - 1 or req.all_ids[start] != token:
                break
            start += 1
        return start

    @torch.inference_mode()
    def follow(self, chunks: Sequence[ScheduledChunk]) -> None:
        """Run the draft over prefill chunks the target computes this step, so that its
        KV is there when the request's decodes start speculating (the draft's prefill is
        then part of the request's prefill, as the target's is)."""
        steps, tables = [], []
        for c in chunks:
            start, end = self._catch_up_start(c), c.start + c.num_tokens
            if start < end:
                steps.append(ScheduledChunk(c.request, start, end - start))
                tables.append(self.blocks.block_ids(c.request.request_id))
        if not steps:
            return
        self.runner.run(self.runner.prepare(steps, tables, verify_drafts=False))
        for step in steps:
            self._states[step.request.request_id] = _DraftState(step.start + step.num_tokens,
                                                                [])

    @torch.inference_mode()
    def propose(self, chunks: Sequence[ScheduledChunk]) -> list[tuple[int, ...]]:
        """k greedy draft steps for every chunk at once (k: its num_lookahead); the
        first also feeds the tokens the draft has not seen yet."""
        if not chunks:
            return []
        blocks = self._block_tables(chunks)
        drafts: list[list[int]] = [[] for _ in chunks]
        steps = [
            ScheduledChunk(c.request, start, c.request.num_tokens - start)
            for c, start in ((c, self._catch_up_start(c)) for c in chunks)]
        for step in steps:
            self._states[step.request.request_id] = _DraftState(step.start, [])
        active = list(range(len(chunks)))
        for _ in range(max(c.num_lookahead for c in chunks)):
            batch = [steps[i] for i in active]
            t0 = time.perf_counter()
            inputs = self.runner.prepare(batch, [blocks[i] for i in active],
                                         verify_drafts=False, split_short=CATCH_UP_ROWS)
            next_ids = self.runner.run(inputs).argmax(dim=-1).tolist()
            if max(s.num_computed for s in batch) <= 2:
                self.num_forwards += 1
                self.decode_seconds += time.perf_counter() - t0
            still = []
            for i, token in zip(active, next_ids, strict=True):
                drafts[i].append(int(token))
                state = self._states[chunks[i].request.request_id]
                # Its KV now covers this step's input: the known tokens, or the draft fed.
                if steps[i].spec_ids:
                    state.tail.extend(steps[i].spec_ids)
                else:
                    state.num_computed = chunks[i].request.num_tokens
                if len(drafts[i]) < chunks[i].num_lookahead:
                    pos = chunks[i].request.num_tokens + len(drafts[i]) - 1
                    steps[i] = ScheduledChunk(chunks[i].request, pos, 0,
                                              spec_ids=(int(token),))
                    still.append(i)
            active = still
            if not active:
                break
        return [tuple(d) for d in drafts]

    def _block_tables(self, chunks: Sequence[ScheduledChunk]) -> list[list[int]]:
        """The target's block ids of each request (they hold the draft's slots too)."""
        return [self.blocks.block_ids(c.request.request_id) for c in chunks]


def draft_engine_config(config: EngineConfig) -> EngineConfig:
    """The draft model's engine config: the target's, with the draft's model and
    quantization, no speculation of its own and no CUDA graphs."""
    assert config.speculative_draft_model is not None
    return replace(config, model=config.speculative_draft_model,
                   quantization=config.speculative_draft_quantization, speculative="off",
                   cuda_graphs=False, load_format=_load_format(config))


def _load_format(config: EngineConfig) -> str:
    """Dummy weights for a draft that names a preset while the target is dummy too."""
    from services.worker.engine.model.config import PRESETS

    draft = config.speculative_draft_model
    if config.load_format == "dummy" and draft in PRESETS and not Path(str(draft)).exists():
        return "dummy"
    return "auto"
