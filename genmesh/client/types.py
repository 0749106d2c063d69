"""What the client SDK returns: plain dataclasses, so callers never touch protos."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from genmesh.core.failure import is_transport_failure
from genmesh.v1 import common_pb2, generation_pb2

_FINISH = {
    common_pb2.FINISH_REASON_UNSPECIFIED: None,
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
    common_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
    common_pb2.FINISH_REASON_ERROR: "error",
}


class GenmeshError(Exception):
    """A call failed: ``code`` is the gRPC status, ``message`` says what to change."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> GenmeshError:
        """The call's status; a stream the connection dropped under it (Envoy resets a
        call whose frontend died mid-response: INTERNAL "Stream removed (RST_STREAM ...)"
        on the wire) is UNAVAILABLE: retryable, as a server's own UNAVAILABLE is."""
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = (exc.details() if hasattr(exc, "details") else str(exc)) or ""
        if is_transport_failure(code, details):
            return cls(grpc.StatusCode.UNAVAILABLE,
                       f"the connection to the mesh broke mid-call ({details}); retry")
        return cls(code, details)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int  # prompt tokens served from the worker's prefix cache
    # Replayed from the response cache (or shared with an identical request in flight):
    # no inference ran, nothing was charged; the counts are the original generation's.
    response_cached: bool = False

    @classmethod
    def from_proto(cls, u: common_pb2.Usage) -> Usage:
        return cls(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens,
                   u.response_cached)


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One of the most likely tokens at a position."""

    token_id: int
    token: str  # the token's own text (U+FFFD for a part of a UTF-8 character)
    token_bytes: bytes  # the bytes it adds to the text
    logprob: float

    @classmethod
    def from_proto(cls, t: generation_pb2.OutputTopLogprob) -> TopLogprob:
        return cls(t.token_id, t.token, t.token_bytes, t.logprob)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token with its logprob (natural log of its probability) and the most
    likely tokens at its position (asked with ``return_logprobs`` / ``logprobs=k``)."""

    token_id: int
    token: str  # the token's own text (U+FFFD for a part of a UTF-8 character)
    token_bytes: bytes  # the bytes it adds to the text
    logprob: float
    top_logprobs: tuple[TopLogprob, ...] = ()  # most likely first

    @classmethod
    def from_proto(cls, t: generation_pb2.OutputLogprob) -> TokenLogprob:
        return cls(t.token_id, t.token, t.token_bytes, t.logprob,
                   tuple(TopLogprob.from_proto(top) for top in t.top_logprobs))


def logprobs_from_proto(logprobs: Iterable[generation_pb2.OutputLogprob]
                        ) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob.from_proto(t) for t in logprobs)


@dataclass(frozen=True, slots=True)
class Choice:
    """One of the n completions of a request (``n=``)."""

    index: int
    text: str
    finish_reason: str | None
    usage: Usage  # this choice's own counts
    finish_detail: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    finish_reason: str | None  # "stop", "length", "abort", "content_filter", "error"
    usage: Usage  # with n > 1: the prompt once, every choice's completion tokens
    model: str
    model_version: str
    request_id: str
    finish_detail: str = ""  # with "content_filter": the category that cut the output
    # With logprobs asked: each token of ``text`` that reached you, in order.
    logprobs: tuple[TokenLogprob, ...] = ()
    # With n > 1: every choice (text, finish_reason, ... above are choices[0]'s).
    choices: tuple[Choice, ...] = ()


@dataclass(frozen=True, slots=True)
class Chunk:
    """One message of a streamed generation."""

    text: str  # new text ("" on the first and last messages)
    finish_reason: str | None = None  # set on the last message (of each choice)
    usage: Usage | None = None  # set on the last message (of each choice: its own)
    model_version: str = ""  # set on the first message
    request_id: str = ""  # set on the first message
    finish_detail: str = ""  # set on the last message; see Completion
    logprobs: tuple[TokenLogprob, ...] = ()  # with logprobs asked: the tokens of ``text``
    index: int = 0  # the choice it belongs to (with n > 1 the choices interleave)


@dataclass(frozen=True, slots=True)
class TurnStarted:
    turn: int
    request_id: str


@dataclass(frozen=True, slots=True)
class TextDelta:
    turn: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # with logprobs asked: the tokens of ``text``


@dataclass(frozen=True, slots=True)
class TurnFinished:
    turn: int
    finish_reason: str | None
    usage: Usage
    finish_detail: str = ""  # see Completion


@dataclass(frozen=True, slots=True)
class ChatError:
    code: grpc.StatusCode
    message: str
    turn: int  # 0: the session


ChatEvent = TurnStarted | TextDelta | TurnFinished | ChatError

_CODES = {c.value[0]: c for c in grpc.StatusCode}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    versions: tuple[str, ...]
    is_default: bool
    max_model_len: int
    has_chat_template: bool


def sampling_params(*, max_tokens: int = 0, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 0.0, min_p: float = 0.0, repetition_penalty: float = 0.0,
                    seed: int | None = None, stop: list[str] | tuple[str, ...] = (),
                    stop_token_ids: list[int] | tuple[int, ...] = (), ignore_eos: bool = False,
                    logprobs: int = 0, return_logprobs: bool = False
                    ) -> common_pb2.SamplingParams:
    """Keyword arguments of every call, as the proto; zero values mean the defaults.
    ``return_logprobs``: each token's logprob comes back; ``logprobs=k`` (0..20): with
    its k most likely alternatives (k > 0 implies return_logprobs)."""
    params = common_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, stop=list(stop),
        stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos, logprobs=logprobs,
        return_logprobs=return_logprobs)
    if seed is not None:
        params.seed = seed
    return params


_PRIORITIES = {
    "": common_pb2.PRIORITY_UNSPECIFIED,
    "interactive": common_pb2.PRIORITY_INTERACTIVE,
    "normal": common_pb2.PRIORITY_NORMAL,
    "batch": common_pb2.PRIORITY_BATCH,
}


def priority_of(name: str) -> common_pb2.Priority:
    """"interactive", "normal" or "batch"; "" leaves it to the call."""
    try:
        return _PRIORITIES[name]
    except KeyError:
        raise ValueError(f"priority must be one of {sorted(_PRIORITIES)}, got {name!r}") from None


def generate_request(prompt: str | None, messages: list[dict[str, str]] | None, *, model: str,
                     model_version: str, request_id: str, params: dict,
                     skip_cache: bool = False, n: int = 0, priority: str = ""
                     ) -> generation_pb2.GenerateRequest:
    """``n``: choices to generate (0: one); ``priority``: see ``priority_of``."""
    if (prompt is None) == (messages is None):
        raise ValueError("pass exactly one of prompt or messages")
    req = generation_pb2.GenerateRequest(model=model, model_version=model_version,
                                         request_id=request_id, params=sampling_params(**params),
                                         skip_cache=skip_cache, n=n,
                                         priority=priority_of(priority))
    if prompt is not None:
        req.prompt = prompt
    else:
        assert messages is not None
        req.chat.messages.extend(generation_pb2.Message(role=m["role"], content=m["content"])
                                 for m in messages)
    return req


def completion_from_proto(r: generation_pb2.GenerateResponse) -> Completion:
    return Completion(r.text, _FINISH[r.finish_reason], Usage.from_proto(r.usage), r.model,
                      r.model_version, r.request_id, r.finish_detail,
                      logprobs_from_proto(r.logprobs),
                      tuple(Choice(c.index, c.text, _FINISH[c.finish_reason],
                                   Usage.from_proto(c.usage), c.finish_detail,
                                   logprobs_from_proto(c.logprobs)) for c in r.choices))


def chunk_from_proto(r: generation_pb2.GenerateStreamResponse) -> Chunk:
    return Chunk(r.text, _FINISH[r.finish_reason],
                 Usage.from_proto(r.usage) if r.HasField("usage") else None,
                 r.model_version, r.request_id, r.finish_detail,
                 logprobs_from_proto(r.logprobs), r.index)


def chat_event_from_proto(e: generation_pb2.ChatEvent) -> ChatEvent:
    kind = e.WhichOneof("event")
    if kind == "turn_started":
        return TurnStarted(e.turn_started.turn, e.turn_started.request_id)
    if kind == "delta":
        return TextDelta(e.delta.turn, e.delta.text, logprobs_from_proto(e.delta.logprobs))
    if kind == "turn_finished":
        f = e.turn_finished
        return TurnFinished(f.turn, _FINISH[f.finish_reason], Usage.from_proto(f.usage),
                            f.finish_detail)
    return ChatError(_CODES.get(e.error.code, grpc.StatusCode.UNKNOWN), e.error.message,
                     e.error.turn)


def start_request(model: str, model_version: str, system_prompt: str, params: dict
                  ) -> generation_pb2.ChatRequest:
    return generation_pb2.ChatRequest(start=generation_pb2.StartSession(
        model=model, model_version=model_version, system_prompt=system_prompt,
        params=sampling_params(**params)))


def turn_request(content: str, params: dict) -> generation_pb2.ChatRequest:
    turn = generation_pb2.UserTurn(content=content)
    if params:
        turn.params.CopyFrom(sampling_params(**params))
    return generation_pb2.ChatRequest(turn=turn)


CANCEL = generation_pb2.ChatRequest(cancel=generation_pb2.CancelTurn())
END = generation_pb2.ChatRequest(end=generation_pb2.EndSession())


def models_from_proto(r: generation_pb2.ListModelsResponse) -> list[ModelInfo]:
    return [ModelInfo(m.name, tuple(m.versions), m.is_default, m.max_model_len,
                      m.has_chat_template) for m in r.models]


_JOB_STATES = {
    generation_pb2.JOB_STATE_UNSPECIFIED: "unspecified",
    generation_pb2.JOB_STATE_QUEUED: "queued",
    generation_pb2.JOB_STATE_RUNNING: "running",
    generation_pb2.JOB_STATE_SUCCEEDED: "succeeded",
    generation_pb2.JOB_STATE_FAILED: "failed",
    generation_pb2.JOB_STATE_CANCELLED: "cancelled",
}
JOB_ENDED = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True, slots=True)
class Job:
    job_id: str
    state: str  # "queued", "running", "succeeded", "failed" or "cancelled"
    result: Completion | None  # with "succeeded"
    error: GenmeshError | None  # with "failed"
    num_attempts: int  # more than 1 when another frontend took the job over
    created_unix_ms: int
    updated_unix_ms: int

    @property
    def has_ended(self) -> bool:
        return self.state in JOB_ENDED


def job_from_proto(j: generation_pb2.Job) -> Job:
    state = _JOB_STATES.get(j.state, "unspecified")
    return Job(j.job_id, state,
               completion_from_proto(j.result) if state == "succeeded" else None,
               GenmeshError(_CODES.get(j.error_code, grpc.StatusCode.UNKNOWN), j.error)
               if state == "failed" else None,
               j.num_attempts, j.created_unix_ms, j.updated_unix_ms)


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One request of a batch: ``id`` is yours, echoed in its result."""

    id: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    params: dict | None = None  # sampling keyword arguments (max_tokens, temperature, ...)
    n: int = 0  # choices to generate (0: one)
    priority: str = ""  # "interactive", "normal" or "batch" ("": batch, the call's)


@dataclass(frozen=True, slots=True)
class BatchResult:
    id: str
    completion: Completion | None  # set when the item succeeded
    error: GenmeshError | None = None  # set when it failed


def batch_request(item: BatchItem, *, model: str, model_version: str
                  ) -> generation_pb2.BatchRequest:
    return generation_pb2.BatchRequest(id=item.id, request=generate_request(
        item.prompt, item.messages, model=model, model_version=model_version, request_id="",
        params=item.params or {}, n=item.n, priority=item.priority))


def batch_result_from_proto(r: generation_pb2.BatchResult) -> BatchResult:
    if r.error_code:
        return BatchResult(r.id, None, GenmeshError(
            _CODES.get(r.error_code, grpc.StatusCode.UNKNOWN), r.error))
    return BatchResult(r.id, completion_from_proto(r.response))


class TurnTracker:
    """Follows the events of the turn just sent: its number (from TurnStarted) and its
    end (TurnFinished); a ChatError for it (or for the session) raises GenmeshError."""

    def __init__(self) -> None:
        self.number = 0

    def is_last(self, event: ChatEvent) -> bool:
        if isinstance(event, TurnStarted):
            self.number = event.turn
        if isinstance(event, ChatError) and event.turn in (self.number, 0):
            raise GenmeshError(event.code, event.message)
        return isinstance(event, TurnFinished) and event.turn == self.number


def session_ended_mid_turn() -> GenmeshError:
    return GenmeshError(grpc.StatusCode.UNAVAILABLE, "the chat session ended mid-turn")


API_KEY_HEADER = "x-api-key"
API_KEY_ENV = "GENMESH_API_KEY"
# The key of the `dev` tenant of deploy/local.yaml (unless $GENMESH_DEV_API_KEY overrides
# it there): what the CLI sends to a local mesh when no key is given.
DEV_API_KEY = "genmesh-dev-key"


def with_api_key(metadata: tuple[tuple[str, str], ...], api_key: str | None
                 ) -> tuple[tuple[str, str], ...]:
    """``metadata`` plus the API key: ``api_key``, else $GENMESH_API_KEY, else none."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    if not key or any(k == API_KEY_HEADER for k, _ in metadata):
        return metadata
    return (*metadata, (API_KEY_HEADER, key))
