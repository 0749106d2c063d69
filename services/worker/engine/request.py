"""The state of one request (sequence) inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from services.worker.engine.outputs import FinishReason, RequestTimings
from services.worker.engine.params import (
    InvalidRequestError,
    Priority,
    SamplingParams,
    validate_prompt,
)

PLACEHOLDER_TOKEN = -1  # a sampled token still on the device (see append_placeholder)


class RequestStatus(enum.Enum):
    WAITING_FOR_GRAMMAR = "waiting_for_grammar"  # its constraint's grammar is being built;
    # held by the engine core, not in the scheduler's queues yet
    WAITING = "waiting"  # queued; holds no blocks
    RUNNING = "running"  # scheduled; holds blocks
    FINISHED = "finished"  # done; blocks released


@dataclass(slots=True, eq=False)
class Request:
    """One sequence. Only the scheduler changes its status and token counts.

    Tokens are ``prompt_ids + output_ids``; ``num_computed_tokens`` counts those whose
    KV is in the cache. Prefill and decode are the same thing: each step computes some
    of the ``num_tokens - num_computed_tokens`` tokens still missing.

    The timing fields are set by the engine core, which owns the clock; all are on the
    clock of ``arrival_time`` (``time.monotonic`` unless the core was given another).
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
    first_scheduled_time: float | None = None  # start of the first step it was part of
    first_token_time: float | None = None  # when its first output token was sampled
    finished_time: float | None = None
    device_seconds: float = 0.0  # its token-proportional share of its steps' wall time
    has_placeholder: bool = False  # the last token is PLACEHOLDER_TOKEN (not read back yet)
    # Speculative decoding: draft tokens the next step may verify, set by the engine's
    # speculation before each schedule (0: a plain step). The scheduler reserves KV
    # slots for them with the decode's own.
    num_lookahead: int = 0

    def __post_init__(self) -> None:
        self.all_ids = list(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def is_at_length_limit(self, max_model_len: int) -> bool:
        """Its output reached max_tokens, or the sequence the context (a placeholder
        counts: its token ends the request whatever it turns out to be)."""
        return len(self.output_ids) >= self.params.max_tokens or self.num_tokens >= max_model_len

    def lookahead_room(self, max_model_len: int) -> int:
        """The most drafts one step may verify: a step with k drafts can emit k + 1
        tokens, which must fit both max_tokens and the context."""
        return max(0, min(self.params.max_tokens - len(self.output_ids),
                          max_model_len - self.num_tokens) - 1)

    def append_output(self, token_id: int) -> None:
        if self.has_placeholder:
            self.output_ids[-1] = self.all_ids[-1] = token_id
            self.has_placeholder = False
            return
        self.output_ids.append(token_id)
        self.all_ids.append(token_id)

    def append_placeholder(self) -> None:
        """Count the token the step in flight samples before it is read back (async
        scheduling): the scheduler can then schedule its decode; ``append_output`` fills
        it in."""
        self.output_ids.append(PLACEHOLDER_TOKEN)
        self.all_ids.append(PLACEHOLDER_TOKEN)
        self.has_placeholder = True

    def drop_placeholder(self) -> None:
        """Forget a token that will never be read back (the request ended first)."""
        if self.has_placeholder:
            self.output_ids.pop()
            self.all_ids.pop()
            self.has_placeholder = False

    def timings(self) -> RequestTimings:
        """Its stages once finished; a stage it never reached takes no time."""
        if self.finished_time is None:
            raise ValueError(f"request {self.request_id!r} has not finished")
        end = self.finished_time
        scheduled = self.first_scheduled_time if self.first_scheduled_time is not None else end
        first_token = self.first_token_time if self.first_token_time is not None else end
        return RequestTimings(arrival_time=self.arrival_time,
                              queue_s=scheduled - self.arrival_time,
                              prefill_s=first_token - scheduled,
                              decode_s=end - first_token,
                              device_seconds=self.device_seconds)


def new_request(request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                vocab_size: int, max_model_len: int, priority: Priority, cache_salt: str,
                arrival_time: float) -> Request:
    """Validate and build a request (raises InvalidRequestError naming the field)."""
    if not request_id:
        raise InvalidRequestError("request_id", "must not be empty")
    validate_prompt(prompt_ids, vocab_size=vocab_size, max_model_len=max_model_len)
    params.validate(vocab_size=vocab_size)
    return Request(request_id=request_id, prompt_ids=list(prompt_ids), params=params,
                   priority=Priority(priority), cache_salt=cache_salt,
                   arrival_time=arrival_time)
