"""What a caller asks of one generation: sampling parameters, priority, and their checks."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

MAX_ABS_PENALTY = 2.0  # presence_penalty and frequency_penalty lie in [-2, 2] (OpenAI's range)
MAX_ABS_LOGIT_BIAS = 100.0  # a logit bias lies in [-100, 100] (OpenAI's range)


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


class ConstraintKind(enum.Enum):
    """The language a constrained output must belong to."""

    JSON_OBJECT = "json_object"  # any JSON object
    JSON_SCHEMA = "json_schema"  # a JSON value that validates against a JSON Schema
    REGEX = "regex"  # text that matches a regular expression in full
    GRAMMAR = "grammar"  # text in the language of a context-free grammar


@dataclass(frozen=True, slots=True)
class Constraint:
    """What the generated text must be, enforced token by token while decoding: a token
    the grammar cannot continue with is never sampled, and the end token only once the
    text is complete. Equal constraints share one compiled grammar.

    JSON is generated in one layout: ``json.dumps``'s default separators (", " and ": ")
    and no other whitespace, so a model cannot stall in whitespace.
    """

    kind: ConstraintKind
    # JSON_SCHEMA: the schema as JSON text; REGEX: the pattern (Rust ``regex`` syntax,
    # anchored at both ends); GRAMMAR: a Lark grammar (llguidance's dialect, rule
    # ``start``) or a GBNF one (rule ``root``); JSON_OBJECT: unused, "".
    spec: str = ""
    # JSON_SCHEMA only. True: keywords the grammar engine cannot enforce are an error, and
    # an object schema without ``additionalProperties`` allows no other properties (as
    # OpenAI's strict mode). False: such keywords are ignored, and properties the schema
    # does not close are allowed, as JSON Schema says.
    strict: bool = True


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
    # OpenAI's penalties over the generated tokens (not the prompt), in [-2, 2]: a token's
    # logit loses presence_penalty once it has appeared, frequency_penalty per appearance.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, bias) pairs, each id once: the bias, in [-100, 100], is added to that
    # token's logit before sampling (-100 in effect bans it, 100 forces it).
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0  # the end and stop tokens cannot be sampled before this many tokens
    constraint: Constraint | None = None  # None: free text
    # Speculative decoding for this request where the worker has it: None follows the
    # deployment's default. It never changes the tokens (greedy, or a seed's draws), only
    # the speed; it is skipped while a penalty, a constraint or
    # min_tokens makes each token depend on the one before it.
    speculative: bool | None = None

    @property
    def can_speculate(self) -> bool:
        """Several tokens can be verified in one step: no knob reads the output."""
        return not self.reads_output

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def reads_output(self) -> bool:
        """Its next token depends on the tokens generated so far (a penalty or a
        constraint), so the previous one must be on the host before it is sampled."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0 or self.constraint is not None)

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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY:  # also rejects NaN
                raise InvalidRequestError(name, f"must be in [-2, 2], got {value}")
        self._validate_logit_bias(vocab_size)
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(
                "min_tokens", f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        if self.constraint is not None:
            # Imported here: only constrained requests need the grammar engine.
            from services.worker.engine.grammar import grammar_of

            grammar_of(self.constraint)  # raises InvalidRequestError("constraint", ...)

    def _validate_logit_bias(self, vocab_size: int) -> None:
        seen: set[int] = set()
        for token_id, bias in self.logit_bias:
            if not 0 <= token_id < vocab_size:
                raise InvalidRequestError(
                    "logit_bias",
                    f"token id {token_id} is outside the vocabulary [0, {vocab_size})")
            if token_id in seen:
                raise InvalidRequestError("logit_bias", f"token id {token_id} appears twice")
            seen.add(token_id)
            if not (math.isfinite(bias) and abs(bias) <= MAX_ABS_LOGIT_BIAS):
                raise InvalidRequestError(
                    "logit_bias", f"the bias of token {token_id} must be in [-100, 100], "
                    f"got {bias}")


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
