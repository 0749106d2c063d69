"""The constrained requests' grammar matchers and their token masks.

Owned by the engine core and used from its thread only, except grammar building: that
runs on a thread of its own (llguidance drops the GIL while it builds), once per
distinct constraint (an LRU cache of ready matchers in their start state); each request
then gets a copy of its grammar's matcher. A request waits, outside the scheduler's
queues, until its copy exists, so a slow grammar never holds up a step.

A matcher advances only on tokens read back from the device (``accept``), never on a
placeholder: with async scheduling the core reads the previous token back before it
samples a constrained request's next one (``SamplingParams.reads_output``), so there is
nothing to roll back when a request ends or is preempted (preemption keeps its output,
and so its matcher's state).
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.worker.engine.grammar import grammar_of
from services.worker.engine.logits_processors import TokenBitmask
from services.worker.engine.params import Constraint, InvalidRequestError

NUM_CACHED_MATCHERS = 256  # distinct constraints whose start-state matcher is kept
# Threads that compute a step's masks in parallel: a quarter of the cores, 1 to 8. More
# spin against the model's own CPU threads: with llguidance's default pool (most of the
# cores) a 2-core machine's mean decode step at batch 32 went from ~40 ms to 70-140 ms.
NUM_MASK_THREADS = max(1, min(8, (os.cpu_count() or 1) // 4))


@dataclass(frozen=True, slots=True)
class Rejection:
    """A sampled token the request's grammar refused."""

    message: str
    # The token's own mask allowed it: the grammar engine's mask and its parser disagree,
    # which happens when the grammar needs bytes no token of the vocabulary holds (e.g.
    # a regex of one character whose UTF-8 lead byte has no token). The request asked
    # for text this model cannot write. False: the mask was not applied (our bug).
    allowed_by_mask: bool


class StructuredOutput:
    def __init__(self, tokenizer_file: Path | None, *, vocab_size: int,
                 eos_token_ids: tuple[int, ...],
                 max_cached_matchers: int = NUM_CACHED_MATCHERS) -> None:
        """``tokenizer_file``: the model's ``tokenizer.json`` (None: no constraint can be
        enforced); ``vocab_size``: the width of the model's logits, which may exceed the
        tokenizer's vocabulary (padding) or fall short of it."""
        self.tokenizer_file = tokenizer_file
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.max_cached_matchers = max_cached_matchers
        self._pool: ThreadPoolExecutor | None = None  # builds grammars; started when needed
        self._tokenizer: Any = None  # llguidance.LLTokenizer, built on the pool's thread
        self._num_words = 0  # int32 words of one token mask, known once the tokenizer is
        # Constraint -> its matcher in the start state (building or built), LRU order.
        self._templates: collections.OrderedDict[Constraint, Future[Any]] = (
            collections.OrderedDict())
        self._building: dict[str, Future[Any]] = {}  # request id -> its grammar's future
        self._matchers: dict[str, Any] = {}  # request id -> its llguidance.LLMatcher
        # Request id -> (the step's mask bits, its row): the last mask it was sampled under.
        self._last_masks: dict[str, tuple[torch.Tensor, int]] = {}
        self._executor: Any = None  # llguidance.LLExecutor: masks of many rows in parallel

    @property
    def is_available(self) -> bool:
        return self.tokenizer_file is not None

    # -- requests --------------------------------------------------------------------

    def start(self, request_id: str, constraint: Constraint) -> None:
        """Build (or find) the request's grammar; ``take_ready`` says when it can run."""
        if self.tokenizer_file is None:
            raise InvalidRequestError(
                "constraint", "this model has no tokenizer.json, so constraints cannot be "
                "enforced")
        self._building[request_id] = self._template(constraint)

    def take_ready(self) -> tuple[list[str], dict[str, str]]:
        """The requests whose grammar is now built (each gets its own matcher), and those
        whose grammar failed to build, with the error."""
        ready: list[str] = []
        failed: dict[str, str] = {}
        for request_id, future in list(self._building.items()):
            if not future.done():
                continue
            del self._building[request_id]
            exc = future.exception()
            if exc is not None:
                failed[request_id] = f"the constraint's grammar failed to build: {exc}"
                continue
            self._matchers[request_id] = future.result().deep_copy()
            ready.append(request_id)
        return ready, failed

    @property
    def num_building(self) -> int:
        return len(self._building)

    @property
    def cached_constraints(self) -> list[Constraint]:
        """The constraints whose grammar is kept, least recently used first."""
        return list(self._templates)

    def wait(self, timeout_s: float) -> None:
        """Block until a grammar being built is done, or ``timeout_s`` passes."""
        if self._building:
            concurrent.futures.wait(list(self._building.values()), timeout=timeout_s,
                                    return_when=concurrent.futures.FIRST_COMPLETED)

    def accept(self, request_id: str, token_id: int) -> Rejection | None:
        """Advance the request's matcher by a sampled token; a Rejection if the grammar
        refuses it (the mask should have made that impossible)."""
        matcher = self._matchers.get(request_id)
        if matcher is None or matcher.consume_token(token_id):
            return None
        last = self._last_masks.get(request_id)
        allowed = last is not None and _allows(last[0][last[1]], token_id)
        if allowed:
            return Rejection(
                "the constraint asks for text this model's vocabulary cannot write (its "
                "grammar needs bytes that no token of the vocabulary holds)",
                allowed_by_mask=True)
        return Rejection(f"the constraint's grammar rejected token {token_id}, which its "
                         "mask did not allow", allowed_by_mask=False)

    def is_finished(self, request_id: str) -> bool:
        """The request's text is complete and its grammar allows nothing more."""
        matcher = self._matchers.get(request_id)
        return matcher is not None and bool(matcher.is_stopped())

    def release(self, request_id: str) -> None:
        self._building.pop(request_id, None)
        self._matchers.pop(request_id, None)
        self._last_masks.pop(request_id, None)

    # -- one step --------------------------------------------------------------------

    def bitmask(self, request_ids: list[str]) -> TokenBitmask | None:
        """The next-token masks of the constrained ones among a step's rows (row i is
        request_ids[i]); None when no row is constrained."""
        rows = [i for i, rid in enumerate(request_ids) if rid in self._matchers]
        if not rows:
            return None
        bits = torch.empty((len(rows), self._num_words), dtype=torch.int32)
        row_bytes = self._num_words * 4
        matchers = [self._matchers[request_ids[i]] for i in rows]
        if len(matchers) == 1:
            matchers[0].unsafe_compute_mask_ptr(bits.data_ptr(), row_bytes)
        else:
            if self._executor is None:
                import llguidance

                self._executor = llguidance.LLExecutor(num_threads=NUM_MASK_THREADS)
            self._executor.unsafe_compute_mask_ptr(
                [(m, k) for k, m in enumerate(matchers)], bits.data_ptr(), row_bytes,
                len(matchers))
        for k, i in enumerate(rows):
            self._last_masks[request_ids[i]] = (bits, k)
        return TokenBitmask(rows=rows, bits=bits)

    # -- grammars --------------------------------------------------------------------

    def _template(self, constraint: Constraint) -> Future[Any]:
        future = self._templates.get(constraint)
        if future is not None:
            self._templates.move_to_end(constraint)
            return future
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        future = self._pool.submit(self._build, constraint)
        self._templates[constraint] = future
        while len(self._templates) > self.max_cached_matchers:
            self._templates.popitem(last=False)
        return future

    def _build(self, constraint: Constraint) -> Any:
        """On the pool's thread: the constraint's matcher in its start state."""
        import llguidance

        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        # log_level 0: a rejected token is reported by the core (an ERROR delta), not on stderr.
        matcher = llguidance.LLMatcher(self._tokenizer, grammar_of(constraint), log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def _load_tokenizer(self) -> Any:
        import llguidance

        assert self.tokenizer_file is not None
        text = self.tokenizer_file.read_text()
        eos = list(self.eos_token_ids) or None
        tokenizer = llguidance.LLTokenizer(text, eos_token=eos)
        if tokenizer.vocab_size < self.vocab_size:  # the model pads its vocabulary
            tokenizer = llguidance.LLTokenizer(text, n_vocab=self.vocab_size, eos_token=eos)
        self._num_words = -(-tokenizer.vocab_size // 32)
        return tokenizer

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _allows(row: torch.Tensor, token_id: int) -> bool:
    """Whether a mask row (int32 words, bit j of word w: token 32 w + j) allows a token."""
    word, bit = divmod(token_id, 32)
    return word < row.numel() and (int(row[word]) >> bit) & 1 == 1
