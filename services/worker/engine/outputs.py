"""What the engine hands back: per-step deltas of a request, and engine-wide stats."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.Enum):
    STOP = "stop"  # an end token or a stop token id was generated
    LENGTH = "length"  # max_tokens reached, or the context is full
    ABORT = "abort"  # the caller cancelled
    ERROR = "error"  # the engine failed while serving this request


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int  # prompt tokens whose KV came from the prefix cache


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float  # natural log of the model's probability (raw logits, before sampling knobs)
    top: tuple[tuple[int, float], ...] = ()  # the top-n (token id, logprob), most likely first


@dataclass(frozen=True, slots=True)
class RequestTimings:
    """Where one finished request's time went. Times are ``time.monotonic()`` seconds
    of the engine's process; the three stages are consecutive and cover arrival to finish.
    """

    arrival_time: float  # when the engine accepted the request
    queue_s: float  # arrival -> first scheduled (arrival -> finish if never scheduled)
    prefill_s: float  # first scheduled -> first output token sampled (-> finish if none)
    # first token -> finished; waits after a preemption count here (the request has
    # streamed tokens already, so that wait is seen by the caller as slow decoding)
    decode_s: float
    device_seconds: float  # its share of the wall time of the steps it was part of

    @property
    def finished_time(self) -> float:
        return self.arrival_time + self.queue_s + self.prefill_s + self.decode_s


@dataclass(frozen=True, slots=True)
class Delta:
    """New output of one request since its previous delta."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None  # set on the last delta only
    usage: Usage | None = None  # set on the last delta only
    logprobs: list[TokenLogprob] | None = None  # one per new token when requested
    error: str | None = None  # set when finish_reason is ERROR
    # Set on the last delta only; None when the request never reached the engine's queue.
    timings: RequestTimings | None = None
    # Set with ``error`` when the request itself is at fault, not the engine: names the
    # offending input (a constraint whose grammar cannot build, or that asks for text the
    # model's vocabulary cannot write). Servicers answer INVALID_ARGUMENT.
    invalid_field: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def merge_deltas(deltas: list[Delta]) -> Delta:
    """Consecutive deltas of one request as one: their tokens (and logprobs) in order,
    the last one's finish, usage, error and timings."""
    if len(deltas) == 1:
        return deltas[0]
    last = deltas[-1]
    has_logprobs = any(d.logprobs for d in deltas)
    return Delta(last.request_id, [t for d in deltas for t in d.new_token_ids],
                 finish_reason=last.finish_reason, usage=last.usage,
                 logprobs=[lp for d in deltas for lp in d.logprobs or []] if has_logprobs
                 else None,
                 error=last.error, timings=last.timings, invalid_field=last.invalid_field)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine's load and caches."""

    num_running: int
    num_waiting: int
    num_kv_blocks_total: int
    num_kv_blocks_free: int  # free, including cached blocks that can be evicted
    num_kv_blocks_cached: int  # blocks holding a reusable prefix (in use or not)
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    num_preemptions: int
    num_steps: int
    num_finished: int
    generated_tokens: int
    mean_batch_size: float  # requests per step over the recent window
    mean_step_ms: float  # wall time per step over the recent window
    device_seconds: float  # wall time of every step so far (the sum of requests' shares)
    recent_batch_sizes: list[int] = field(default_factory=list)
    # Where a step's host time goes, over the recent window. On CUDA the forward only
    # launches work; the wait for the device shows in sampling, which reads tokens back.
    mean_prepare_ms: float = 0.0  # scheduling output -> device inputs (persistent batch)
    mean_forward_ms: float = 0.0  # the model's forward (a graph replay or eager launches)
    mean_sample_ms: float = 0.0  # sampling and the read back of the sampled ids
    cuda_graph_batch_sizes: list[int] = field(default_factory=list)  # captured; [] = none
    cuda_graph_pool_bytes: int = 0  # device memory the captured graphs hold
    cuda_graph_replays: int = 0  # decode steps served by a graph
    # Speculative decoding (zeros when off): drafts verified, those accepted, the
    # request-steps that verified drafts, and the tokens those emitted (accepted + 1).
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_verifications: int = 0
    spec_emitted_tokens: int = 0

    @property
    def spec_acceptance_rate(self) -> float:
        """Accepted drafts per verified draft."""
        return self.spec_accepted_tokens / self.spec_proposed_tokens if (
            self.spec_proposed_tokens) else 0.0

    @property
    def spec_tokens_per_step(self) -> float:
        """Tokens a request emits per step in which it verified drafts."""
        return self.spec_emitted_tokens / self.spec_verifications if (
            self.spec_verifications) else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        if not self.prefix_cache_queries:
            return 0.0
        return self.prefix_cache_hits / self.prefix_cache_queries
