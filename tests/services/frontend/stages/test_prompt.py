"""The prompt stage over fake tokenizer and safety stubs: the ids and the count it sets,
the check beside tokenization (a block refuses before anything runs, a redaction is
tokenized again), and the errors of the tokenizer."""

from __future__ import annotations

import grpc
import pytest

from genmesh.core.models.chat_template import ChatMessage
from services.frontend.errors import PipelineError
from services.frontend.events import Started
from services.frontend.moderation import SafetyGate, SafetySettings
from services.frontend.stages.prompt import Tokenize, TokenizeAndCheck
from tests.services.frontend.stages.fakes import (
    FakeSafety,
    FakeTokenizer,
    Upstream,
    call_of,
    collect,
    request,
    rpc_error,
    run,
)

STARTED = Started("r1", "m", "v1", 2)


def checked(tokenizer: FakeTokenizer, safety: FakeSafety) -> TokenizeAndCheck:
    return TokenizeAndCheck(tokenizer, SafetyGate(safety, SafetySettings()),  # type: ignore[arg-type]
                            rpc_timeout_s=1.0)


def test_tokenize_sets_the_ids_and_the_count_then_runs_the_rest():
    tokenizer, upstream = FakeTokenizer(), Upstream(STARTED)
    call = call_of(request(prompt="Hello big world"))
    events = run(collect(Tokenize(tokenizer, rpc_timeout_s=1.0).run(call, upstream)))  # type: ignore[arg-type]
    assert events == [STARTED]
    assert call.prompt_ids == [5, 3, 5] and call.tokens.num_prompt == 3
    assert call.observer.stages == ["tokenize"]  # type: ignore[attr-defined]
    assert upstream.is_closed


def test_a_chat_is_rendered_by_the_template():
    tokenizer = FakeTokenizer()
    req = request(prompt=None, messages=(ChatMessage("system", "Be brief"),
                                         ChatMessage("user", "Hi")))
    call = call_of(req)
    run(collect(Tokenize(tokenizer, rpc_timeout_s=1.0).run(call, Upstream(STARTED))))  # type: ignore[arg-type]
    assert tokenizer.texts == ["system: Be brief user: Hi"]
    assert call.prompt_ids == [7, 2, 5, 5, 2]


def test_a_prompt_without_tokens_is_invalid():
    upstream = Upstream(STARTED)
    with pytest.raises(PipelineError, match="the prompt has no tokens") as err:
        run(collect(Tokenize(FakeTokenizer(), rpc_timeout_s=1.0).run(  # type: ignore[arg-type]
            call_of(request(prompt=" ")), upstream)))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert upstream.num_calls == 0


@pytest.mark.parametrize(("error", "code", "words"), [
    (rpc_error(grpc.StatusCode.UNAVAILABLE, "down"), grpc.StatusCode.UNAVAILABLE,
     "the tokenizer is unavailable (down); retry shortly"),
    (rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "too long"), grpc.StatusCode.INVALID_ARGUMENT,
     "too long"),
    (rpc_error(grpc.StatusCode.DATA_LOSS, "bad"), grpc.StatusCode.INTERNAL,
     "the tokenizer failed: bad"),
])
def test_tokenizer_errors_as_the_caller_sees_them(error, code, words):
    with pytest.raises(PipelineError) as err:
        run(collect(Tokenize(FakeTokenizer(error), rpc_timeout_s=1.0).run(  # type: ignore[arg-type]
            call_of(), Upstream(STARTED))))
    assert (err.value.code, err.value.message) == (code, words)


def test_an_allowed_prompt_is_checked_beside_its_tokenization():
    tokenizer, safety = FakeTokenizer(), FakeSafety()
    call = call_of(request(prompt="Hello there"))
    events = run(collect(checked(tokenizer, safety).run(call, Upstream(STARTED))))
    assert events == [STARTED]
    assert safety.checked == ["Hello there"] and tokenizer.texts == ["Hello there"]
    assert call.prompt_ids == [5, 5]
    assert sorted(call.observer.stages) == ["prompt_check", "tokenize"]  # type: ignore[attr-defined]


def test_a_blocked_prompt_is_refused_before_the_rest_runs():
    upstream = Upstream(STARTED)
    with pytest.raises(PipelineError) as err:
        run(collect(checked(FakeTokenizer(), FakeSafety()).run(
            call_of(request(prompt="say BAD things")), upstream)))
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.message == "the prompt was refused by the safety policy (violence)"
    assert upstream.num_calls == 0


def test_a_redacted_prompt_replaces_the_request_and_is_tokenized_again():
    tokenizer = FakeTokenizer()
    call = call_of(request(prompt="my secret code"))
    run(collect(checked(tokenizer, FakeSafety()).run(call, Upstream(STARTED))))
    assert call.req.prompt == "my [redacted] code"
    assert tokenizer.texts[-1] == "my [redacted] code"
    assert call.prompt_ids == [2, 10, 4]


def test_a_chat_checks_only_messages_not_checked_before():
    safety = FakeSafety()
    req = request(prompt=None, num_checked_messages=2, messages=(
        ChatMessage("system", "sys"), ChatMessage("user", "old secret"),
        ChatMessage("assistant", "reply"), ChatMessage("user", "new secret")))
    call = call_of(req)
    run(collect(checked(FakeTokenizer(), safety).run(call, Upstream(STARTED))))
    assert safety.checked == ["new secret"]  # the history and the model's own text: not
    assert call.req.messages[-1] == ChatMessage("user", "new [redacted]")
    assert call.req.messages[1] == ChatMessage("user", "old secret")
