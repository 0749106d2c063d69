"""What a caller asks of one generation: sampling parameters, priority, and their checks."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class InvalidRequestError(ValueError):
    """A request the engine refuses; ``field`` names the offending input.

    Raised synchronously by ``submit`` so nothing is queued; the engine keeps serving.
    Servicers map it to INVALID_ARGUMENT.
    """

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class Priority(enum.IntEnum):
    """Scheduling class; a lower value is served first and preempted last."""

    INTERACTIVE = 0  # online chat and streaming
    NORMAL = 1  # unary calls
    BATCH = 2  # offline batch and async jobs


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    Defaults are greedy decoding of up to 128 tokens that stops at the model's end
    tokens.
    """

    max_tokens: int = 128  # upper bound on generated tokens; >= 1
    temperature: float = 0.0  # 0 means greedy (argmax); > 0 scales logits
    top_k: int = 0  # keep the k most likely tokens; 0 means all
    top_p: float = 1.0  # nucleus mass to keep, in (0, 1]
    min_p: float = 0.0  # drop tokens below min_p * p(most likely), in [0, 1)
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output
    seed: int | None = None  # fixes the sampled sequence; None means nondeterministic
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end generation (kept in output)
    ignore_eos: bool = False  # keep going past the model's end tokens
    logprobs: int = 0  # number of top alternatives (with their logprobs) to return per token

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, *, vocab_size: int) -> None:
        """Raise InvalidRequestError naming the first bad field."""
        if self.max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise InvalidRequestError("temperature", f"must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise InvalidRequestError("min_p", f"must be in [0, 1), got {self.min_p}")
        if not self.repetition_penalty > 0.0:
            raise InvalidRequestError(
                "repetition_penalty", f"must be > 0, got {self.repetition_penalty}"
            )
        if not 0 <= self.logprobs <= 20:
            raise InvalidRequestError("logprobs", f"must be in [0, 20], got {self.logprobs}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequestError("seed", f"must be in [0, 2^63), got {self.seed}")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(
                "stop_token_ids", f"ids {bad[:5]} are outside the vocabulary [0, {vocab_size})"
            )


def validate_prompt(prompt_ids: list[int], *, vocab_size: int, max_model_len: int) -> None:
    """Raise InvalidRequestError if the prompt cannot be served."""
    if not prompt_ids:
        raise InvalidRequestError("prompt_ids", "the prompt is empty")
    if len(prompt_ids) >= max_model_len:
        raise InvalidRequestError(
            "prompt_ids",
            f"the prompt has {len(prompt_ids)} tokens; the model's context is "
            f"{max_model_len} tokens and at least one must be left to generate",
        )
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            "prompt_ids", f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})"
        )
