"""In-process fakes of what the stages call: the tokenizer, safety, cache and worker stubs,
the detokenizers and the token budgets, each recording what it was asked; and helpers
that run a stage over a scripted upstream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from genmesh.core import metadata
from genmesh.core.models.token_strings import TokenString
from genmesh.v1 import (
    cache_pb2,
    common_pb2,
    generation_pb2,
    safety_pb2,
    tokenizer_pb2,
    worker_pb2,
)
from services.frontend.budget import BudgetExceeded, BudgetPolicy, Reservation
from services.frontend.pipeline import PipelineRequest
from services.frontend.stages.call import Call, StageEvent, TokenCount

BLOCKED = "BAD"  # the phrase the fake safety service blocks, in prompts and in output


def rpc_error(code: grpc.StatusCode, details: str = "") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def request(prompt: str | None = "Hello there", **fields: Any) -> PipelineRequest:
    fields.setdefault("params", common_pb2.SamplingParams(max_tokens=8))
    return PipelineRequest(**{"request_id": "r1", "model": "m", "model_version": "v1",
                              "prompt": prompt, "messages": (), "tenant": "acme", **fields})


class FakeObserver:
    """Records the spans entered and the per-token reports of a call."""

    def __init__(self) -> None:
        self.stages: list[str] = []
        self.busy_kinds: list[str] = []
        self.num_tokens: list[int] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.stages.append(name)
        yield

    def busy(self, kind: str, start_ns: int, end_ns: int) -> None:
        self.busy_kinds.append(kind)

    def tokens(self, num_tokens: int) -> None:
        self.num_tokens.append(num_tokens)


def call_of(req: PipelineRequest | None = None, *, prompt_ids: Sequence[int] = (),
            num_generated: int = 0) -> Call:
    return Call(req or request(), timeout_s=5.0, observer=FakeObserver(),  # type: ignore[arg-type]
                tokens=TokenCount(len(prompt_ids), num_generated), prompt_ids=list(prompt_ids))


class Upstream:
    """``rest`` for a stage under test: streams ``events`` (then raises ``error``) and
    records whether it was called and closed."""

    def __init__(self, *events: StageEvent, error: Exception | None = None) -> None:
        self.events = events
        self.error = error
        self.num_calls = 0
        self.num_read = 0
        self.is_closed = False
        self.stream: AsyncGenerator[StageEvent, None] | None = None  # the last one made

    def __call__(self, call: Call) -> AsyncGenerator[StageEvent, None]:
        self.num_calls += 1
        self.stream = self._stream()
        return self.stream

    async def _stream(self) -> AsyncGenerator[StageEvent, None]:
        try:
            for event in self.events:
                self.num_read += 1
                yield event
            if self.error is not None:
                raise self.error
        finally:
            self.is_closed = True


async def collect(events: AsyncGenerator[StageEvent, None]) -> list[StageEvent]:
    async with contextlib.aclosing(events):
        return [event async for event in events]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def tokens(*token_ids: int,
           finish: common_pb2.FinishReason = common_pb2.FINISH_REASON_UNSPECIFIED,
           usage: common_pb2.Usage | None = None, error: str = "", logprobs: bool = False
           ) -> worker_pb2.WorkerGenerateResponse:
    """A worker message; with ``logprobs``, each token's ``worker_logprob``."""
    return worker_pb2.WorkerGenerateResponse(
        token_ids=token_ids, finish_reason=finish, usage=usage, error=error,
        logprobs=[worker_logprob(t) for t in token_ids] if logprobs else [])


# The fake detokenizer's vocabulary: token id → its text. 0 completes no character (its
# text comes with the next token's); 99 is the end token, a special token the text skips.
TEXTS = {0: "", 1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 6: " B", 7: "AD", 8: " ok",
         9: " END", 10: " secret", 99: ""}
END_TOKEN = 99


def worker_logprob(token_id: int) -> common_pb2.TokenLogprob:
    """The worker's logprob of ``token_id``: -token_id/10, with two alternatives."""
    return common_pb2.TokenLogprob(token_id=token_id, logprob=-token_id / 10, top=[
        common_pb2.TopLogprob(token_id=token_id, logprob=-token_id / 10),
        common_pb2.TopLogprob(token_id=5, logprob=-5.0)])


def output_logprob(token_id: int, num_top: int = 0) -> generation_pb2.OutputLogprob:
    """What the client gets for ``worker_logprob(token_id)`` with ``num_top``."""
    lp, strings = worker_logprob(token_id), FakeTokenStrings()
    out = generation_pb2.OutputLogprob(
        token_id=token_id, token=strings(token_id).text, token_bytes=strings(token_id).raw,
        logprob=lp.logprob)
    for top in lp.top[:num_top]:
        out.top_logprobs.add(token_id=top.token_id, token=strings(top.token_id).text,
                             token_bytes=strings(top.token_id).raw, logprob=top.logprob)
    return out


class FakeTokenStrings:
    """Each token's string from ``TEXTS``; 0's is a part of a character."""

    special_ids = frozenset({END_TOKEN})

    def __call__(self, token_id: int) -> TokenString:
        return (TokenString("\ufffd", b"\xc3") if token_id == 0
                else TokenString(TEXTS[token_id], TEXTS[token_id].encode()))


class FakeDetokenizing:
    def __init__(self, calls: list[tuple[tuple[int, ...], bool]]) -> None:
        self.calls = calls
        self.is_closed = False

    async def text(self, token_ids: Sequence[int], *, final: bool) -> str:
        self.calls.append((tuple(token_ids), final))
        return "".join(TEXTS[t] for t in token_ids)

    async def token_texts(self, token_ids: Sequence[int], *, final: bool
                          ) -> tuple[list[str], str]:
        self.calls.append((tuple(token_ids), final))
        return [TEXTS[t] for t in token_ids], ""

    def close(self) -> None:
        self.is_closed = True


class FakeDetokenizers:
    """In-process detokenizers (that know the tokens' strings); with ``is_remote``, as
    through the tokenizer service (that do not)."""

    def __init__(self, *, is_remote: bool = False) -> None:
        self.is_remote = is_remote
        self.opened: list[FakeDetokenizing] = []
        self.calls: list[tuple[tuple[int, ...], bool]] = []  # every detokenizer's, in order

    def open(self, model: str, *, timeout_s: float) -> FakeDetokenizing:
        self.opened.append(FakeDetokenizing(self.calls))
        return self.opened[-1]

    def token_strings(self, model: str) -> FakeTokenStrings | None:
        return None if self.is_remote else FakeTokenStrings()


class FakeTokenizer:
    """One token per word: its length (so "Hello there" is [5, 5]); a chat renders each
    message as "role: content"."""

    def __init__(self, error: grpc.aio.AioRpcError | None = None) -> None:
        self.error = error
        self.texts: list[str] = []  # every text tokenized (a chat's rendered messages)

    async def Tokenize(self, request: tokenizer_pb2.TokenizeRequest, *, timeout: float
                       ) -> tokenizer_pb2.TokenizeResponse:
        return self._ids(request.text)

    async def ApplyChatTemplate(self, request: tokenizer_pb2.ChatTemplateRequest, *,
                                timeout: float) -> tokenizer_pb2.TokenizeResponse:
        return self._ids(" ".join(f"{m.role}: {m.content}" for m in request.messages))

    def _ids(self, text: str) -> tokenizer_pb2.TokenizeResponse:
        self.texts.append(text)
        if self.error is not None:
            raise self.error
        return tokenizer_pb2.TokenizeResponse(token_ids=[len(w) for w in text.split()])


class FakeModerateCall:
    """A Moderate stream answered like the safety service, at once: text goes back except
    a tail that could still grow into BLOCKED (released by a flush), with "secret"
    redacted; BLOCK from BLOCKED on."""

    def __init__(self) -> None:
        self.written: list[tuple[str, bool]] = []  # (text, flush) per message
        self.replies: asyncio.Queue[safety_pb2.ModerateResponse] = asyncio.Queue()
        self.held = ""
        self.is_cancelled = False

    async def write(self, request: safety_pb2.ModerateRequest) -> None:
        self.written.append((request.text, request.flush))
        text = self.held + request.text
        if BLOCKED in text:
            self.held = ""
            before = text[:text.index(BLOCKED)]
            self.replies.put_nowait(safety_pb2.ModerateResponse(
                text=before, verdict=safety_pb2.VERDICT_BLOCK, reason="violence",
                num_input_chars=len(before)))
            return
        keep = 0 if request.flush else next(
            (n for n in range(len(BLOCKED) - 1, 0, -1) if text.endswith(BLOCKED[:n])), 0)
        self.held = text[len(text) - keep:] if keep else ""
        released = text[:len(text) - keep]
        redacted = released.replace("secret", "[redacted]")
        self.replies.put_nowait(safety_pb2.ModerateResponse(
            text=redacted, num_input_chars=len(released),
            verdict=safety_pb2.VERDICT_REDACT if redacted != released
            else safety_pb2.VERDICT_ALLOW))

    async def read(self) -> safety_pb2.ModerateResponse:
        return await self.replies.get()

    def add_done_callback(self, callback: object) -> None:
        """The stream never ends on its own here: nothing to call back."""

    def cancel(self) -> None:
        self.is_cancelled = True


class FakeSafety:
    """CheckPrompt blocks BLOCKED and redacts "secret" to "[redacted]"."""

    def __init__(self) -> None:
        self.checked: list[str] = []
        self.calls: list[FakeModerateCall] = []

    async def CheckPrompt(self, request: safety_pb2.CheckPromptRequest, *, timeout: float
                          ) -> safety_pb2.CheckResult:
        self.checked.append(request.text)
        if BLOCKED in request.text:
            return safety_pb2.CheckResult(verdict=safety_pb2.VERDICT_BLOCK, reason="violence")
        if "secret" in request.text:
            return safety_pb2.CheckResult(verdict=safety_pb2.VERDICT_REDACT,
                                          redacted_text=request.text.replace("secret",
                                                                             "[redacted]"))
        return safety_pb2.CheckResult(verdict=safety_pb2.VERDICT_ALLOW)

    def Moderate(self, **kwargs: object) -> FakeModerateCall:
        self.calls.append(FakeModerateCall())
        return self.calls[-1]


class FakeCache:
    """A hit with ``answer``, else a miss that leases ``lease_id``; records every call."""

    def __init__(self, answer: cache_pb2.CachedAnswer | None = None, *,
                 lease_id: str = "lease-1") -> None:
        self.answer = answer
        self.lease_id = lease_id
        self.keys: list[cache_pb2.CacheKey] = []
        self.stored: list[cache_pb2.CacheStoreRequest] = []
        self.released: list[str] = []

    async def Lookup(self, request: cache_pb2.LookupRequest, *, timeout: float
                     ) -> cache_pb2.CacheLookupResponse:
        self.keys.append(request.key)
        if self.answer is not None:
            return cache_pb2.CacheLookupResponse(hit=True, answer=self.answer)
        return cache_pb2.CacheLookupResponse(lease_id=self.lease_id)

    async def Store(self, request: cache_pb2.CacheStoreRequest, *, timeout: float
                    ) -> cache_pb2.CacheStoreResponse:
        self.stored.append(request)
        return cache_pb2.CacheStoreResponse(stored=True)

    async def Release(self, request: cache_pb2.ReleaseRequest, *, timeout: float
                      ) -> cache_pb2.ReleaseResponse:
        self.released.append(request.lease_id)
        return cache_pb2.ReleaseResponse()


@dataclass
class FakeWorkerCall:
    messages: Sequence[worker_pb2.WorkerGenerateResponse]
    version: str
    error: grpc.aio.AioRpcError | None = None  # raised after the messages
    num_read: int = 0
    is_cancelled: bool = False

    async def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((metadata.MODEL_VERSION, self.version),)

    def __aiter__(self) -> AsyncGenerator[worker_pb2.WorkerGenerateResponse, None]:
        return self._stream()

    async def _stream(self) -> AsyncGenerator[worker_pb2.WorkerGenerateResponse, None]:
        for msg in self.messages:
            self.num_read += 1
            yield msg
        if self.error is not None:
            raise self.error

    def cancel(self) -> bool:
        self.is_cancelled = True
        return True


@dataclass
class FakeWorker:
    """Streams ``messages`` for every Generate; GetStats answers ``routed_version``."""

    messages: Sequence[worker_pb2.WorkerGenerateResponse]
    version: str = "v1"  # what the worker's headers say served the request
    routed_version: str = "v2"
    error: grpc.aio.AioRpcError | None = None
    requests: list[worker_pb2.WorkerGenerateRequest] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)  # per call, GetStats too
    calls: list[FakeWorkerCall] = field(default_factory=list)
    # Per Generate: the messages the earlier calls had streamed when it came.
    num_read_before: list[int] = field(default_factory=list)
    stats_error: grpc.aio.AioRpcError | None = None  # GetStats raises it when set

    def Generate(self, request: worker_pb2.WorkerGenerateRequest, *, timeout: float,
                 metadata: Sequence[tuple[str, str]]) -> FakeWorkerCall:
        self.num_read_before.append(sum(c.num_read for c in self.calls))
        self.requests.append(request)
        self.metadata.append(dict(metadata))
        self.calls.append(FakeWorkerCall(self.messages, self.version, self.error))
        return self.calls[-1]

    async def GetStats(self, request: worker_pb2.GetStatsRequest, *, timeout: float,
                       metadata: Sequence[tuple[str, str]]) -> worker_pb2.WorkerStats:
        self.metadata.append(dict(metadata))
        if self.stats_error is not None:
            raise self.stats_error
        return worker_pb2.WorkerStats(model_version=self.routed_version)


class FakeBudgets:
    """Token budgets without Redis: admits up to the policy's limit per reservation, and
    records reserves and settles."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []  # ("reserve", tokens) and ("settle", used)

    async def reserve(self, tenant: str, num_tokens: int, policy: BudgetPolicy
                      ) -> Reservation:
        self.log.append(("reserve", num_tokens))
        if num_tokens > policy.tokens_per_minute:
            raise BudgetExceeded(tenant, limit=policy.tokens_per_minute,
                                 num_requested_tokens=num_tokens, num_free_tokens=0,
                                 reset_in_s=1.0)
        return Reservation(tenant, 60, num_tokens, "res-1", self)  # type: ignore[arg-type]

    async def settle(self, reservation: Reservation, num_used_tokens: int) -> int:
        self.log.append(("settle", num_used_tokens))
        return reservation.num_reserved_tokens - num_used_tokens
