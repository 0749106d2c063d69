"""OpenAI request bodies as GenerateRequests: what is taken, and what is refused."""

from __future__ import annotations

import json

import pytest

from genmesh.v1 import common_pb2
from services.httpapi.errors import ApiError
from services.httpapi.schema import chat_request, completion_request, parse_json

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_a_minimal_chat_request_has_openai_defaults() -> None:
    parsed = chat_request(CHAT)
    assert parsed.model == "m" and not parsed.stream and not parsed.include_usage
    req = parsed.request
    assert req.model == "m" and req.n == 1
    assert [(m.role, m.content) for m in req.chat.messages] == [("user", "hi")]
    assert req.params.temperature == 1.0  # OpenAI's default, not greedy
    assert req.params.max_tokens == 0  # the mesh's default
    assert not req.params.HasField("seed") and not req.params.HasField("constraint")


def test_every_sampling_field_reaches_the_params() -> None:
    parsed = chat_request(CHAT | {
        "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "presence_penalty": 1.5,
        "frequency_penalty": -0.5, "seed": 42, "stop": ["\n", "END"],
        "logit_bias": {"13": -100, "7": 5.5}, "top_k": 3, "min_p": 0.1,
        "repetition_penalty": 1.2, "min_tokens": 2, "ignore_eos": True,
        "stop_token_ids": [2], "user": "u-1"})
    p = parsed.request.params
    assert (p.max_tokens, p.temperature, p.top_p, p.presence_penalty, p.frequency_penalty,
            p.seed, list(p.stop), dict(p.logit_bias), p.top_k, p.min_tokens, p.ignore_eos,
            list(p.stop_token_ids)) == (7, 0.0, 0.5, 1.5, -0.5, 42, ["\n", "END"],
                                        {13: -100.0, 7: 5.5}, 3, 2, True, [2])
    assert p.min_p == pytest.approx(0.1) and p.repetition_penalty == pytest.approx(1.2)


def test_speculation_is_asked_for_or_left_to_the_worker() -> None:
    assert chat_request(CHAT | {"speculative": False}).request.params.speculative is False
    assert not chat_request(CHAT).request.params.HasField("speculative")


def test_developer_role_and_text_parts() -> None:
    parsed = chat_request({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "text", "text": "b"}]}]})
    assert [(m.role, m.content) for m in parsed.request.chat.messages] == [
        ("system", "be brief"), ("user", "ab")]


def test_n_choices_are_the_frontends() -> None:
    parsed = chat_request(CHAT | {"n": 3, "seed": 10})
    assert (parsed.request.n, parsed.request.params.seed) == (3, 10)


def test_logprobs() -> None:
    p = chat_request(CHAT | {"logprobs": True, "top_logprobs": 3}).request.params
    assert (p.return_logprobs, p.logprobs) == (True, 3)
    p = chat_request(CHAT).request.params
    assert (p.return_logprobs, p.logprobs) == (False, 0)
    p = completion_request({"model": "m", "prompt": "x", "logprobs": 2}).request.params
    assert (p.return_logprobs, p.logprobs) == (True, 2)
    p = completion_request({"model": "m", "prompt": "x", "logprobs": 0}).request.params
    assert (p.return_logprobs, p.logprobs) == (True, 0)


def test_response_formats_become_constraints() -> None:
    obj = chat_request(CHAT | {"response_format": {"type": "json_object"}})
    assert obj.request.params.constraint.WhichOneof("kind") == "json_object"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    js = chat_request(CHAT | {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema, "strict": True}}}).request.params.constraint
    assert json.loads(js.json_schema.schema) == schema and js.json_schema.strict
    loose = chat_request(CHAT | {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema}}}).request.params.constraint
    assert loose.json_schema.HasField("strict") and not loose.json_schema.strict
    text = chat_request(CHAT | {"response_format": {"type": "text"}})
    assert not text.request.params.HasField("constraint")


def test_stream_options() -> None:
    parsed = chat_request(CHAT | {"stream": True, "stream_options": {"include_usage": True}})
    assert parsed.stream and parsed.include_usage


def test_a_completion_request() -> None:
    parsed = completion_request({"model": "m", "prompt": ["once upon"], "max_tokens": 5,
                                 "echo": False, "logprobs": None, "best_of": 1})
    req = parsed.request
    assert req.prompt == "once upon" and req.params.max_tokens == 5
    assert completion_request({"model": "m", "prompt": "x"}).request.params.max_tokens == 16


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"messages": CHAT["messages"]}, "model", "'model' is required"),
    ({"model": "m"}, "messages", "'messages' is required"),
    (CHAT | {"temperature": 3}, "temperature", "between 0.0 and 2.0"),
    (CHAT | {"temperature": "hot"}, "temperature", "must be a number"),
    (CHAT | {"max_tokens": 0}, "max_tokens", "between 1 and"),
    # Wider than the gRPC API's int32 (the fuzzer's find: it was a 500).
    (CHAT | {"max_tokens": 2 ** 70}, "max_tokens", "between 1 and 2147483647"),
    (CHAT | {"stop_token_ids": [2 ** 31]}, "stop_token_ids", "token ids"),
    (CHAT | {"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "not both"),
    (CHAT | {"n": 17}, "n", "between 1 and 16"),
    (CHAT | {"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    (CHAT | {"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
    (CHAT | {"logit_bias": {"1": 101}}, "logit_bias", "[-100, 100]"),
    (CHAT | {"frobnicate": 1}, "frobnicate", "unrecognized request argument"),
    (CHAT | {"stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
    (CHAT | {"response_format": {"type": "yaml"}}, "response_format", "'yaml'"),
    (CHAT | {"top_logprobs": 2}, "top_logprobs", "needs 'logprobs'"),
    (CHAT | {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "between 0 and 20"),
    ({"model": "m", "prompt": "a", "logprobs": 6}, "logprobs", "between 0 and 5"),
    (CHAT | {"tools": [{"type": "function"}]}, "tools[0]", "must be"),
    (CHAT | {"tool_choice": "sometimes"}, "tool_choice", "must be none, auto, required"),
    (CHAT | {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
     "tools[0]", "JSON Schema object"),
    ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0]",
     "tool_call_id"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0]",
     "must be one of"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0]", "text parts"),
    ({"model": "m", "prompt": ["a", "b"]}, "prompt", "one string"),
    ({"model": "m", "prompt": "a", "echo": True}, "echo", "not supported"),
])
def test_bad_requests_are_400_naming_the_field(body: dict, param: str, says: str) -> None:
    parse = completion_request if "prompt" in body else chat_request
    with pytest.raises(ApiError) as info:
        parse(body)
    assert (info.value.status, info.value.param) == (400, param)
    assert says in info.value.message


@pytest.mark.parametrize("raw", [b"{", b"[1]", b"\xff"])
def test_a_body_that_is_not_a_json_object_is_400(raw: bytes) -> None:
    with pytest.raises(ApiError) as info:
        parse_json(raw)
    assert info.value.status == 400


def test_seed_wraps_into_uint64() -> None:
    p = chat_request(CHAT | {"seed": -1}).request.params
    assert p.seed == 2 ** 64 - 1
    assert isinstance(p, common_pb2.SamplingParams)
