"""The state of one request (sequence) inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from services.worker.engine.outputs import FinishReason
from services.worker.engine.params import Priority, SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued; holds no blocks
    RUNNING = "running"  # scheduled; holds blocks
    FINISHED = "finished"  # done; blocks released


@dataclass(slots=True, eq=False)
class Request:
    """One sequence. Only the scheduler changes its status and token counts.

    Tokens are ``prompt_ids + output_ids``; ``num_computed_tokens`` counts those whose
    KV is in the cache. Prefill and decode are the same thing: each step computes some
    of the ``num_tokens - num_computed_tokens`` tokens still missing.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: Priority = Priority.NORMAL
    cache_salt: str = ""  # isolates prefix-cache entries (e.g. per tenant)
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = -1  # prefix-cache hit at first schedule; -1 = not yet
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    all_ids: list[int] = field(default_factory=list)  # prompt_ids + output_ids, kept in step
    block_hashes: list[bytes] = field(default_factory=list)  # hash chain of full blocks

    def __post_init__(self) -> None:
        self.all_ids = list(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def append_output(self, token_id: int) -> None:
        self.output_ids.append(token_id)
        self.all_ids.append(token_id)
