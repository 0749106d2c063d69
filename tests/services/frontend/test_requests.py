"""Public GenerateRequests as pipeline requests (n, priority and their errors), and whole
GenerateResponses over the in-process fakes: logprobs, and n choices."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from genmesh.v1 import common_pb2, generation_pb2
from services.frontend.catalog import ModelCatalog
from services.frontend.errors import PipelineError
from services.frontend.pipeline import build_pipeline
from services.frontend.requests import generate_whole, pipeline_request
from tests.services.frontend.stages.fakes import (
    FakeDetokenizers,
    FakeTokenizer,
    FakeWorker,
    output_logprob,
    tokens,
)

LENGTH = common_pb2.FINISH_REASON_LENGTH
USAGE = common_pb2.Usage(prompt_tokens=2, completion_tokens=3, cached_prompt_tokens=1)
CATALOG = ModelCatalog(model="m", versions=("v1",), tokenizer=None,  # type: ignore[arg-type]
                       worker=None, rpc_timeout_s=1.0)  # type: ignore[arg-type]


def translate(by_call: common_pb2.Priority = common_pb2.PRIORITY_BATCH, **fields: object):
    """``fields`` of a GenerateRequest, sent by a call that runs at ``by_call``."""
    request = generation_pb2.GenerateRequest(prompt="Hi", **fields)  # type: ignore[arg-type]
    return pipeline_request(request, catalog=CATALOG, tenant="acme", request_id="r1",
                            priority=by_call, method="GenerateBatch")


def test_the_call_s_priority_unless_the_request_names_its_own():
    assert translate().priority == common_pb2.PRIORITY_BATCH
    assert translate(common_pb2.PRIORITY_NORMAL).priority == common_pb2.PRIORITY_NORMAL
    own = translate(common_pb2.PRIORITY_BATCH, priority=common_pb2.PRIORITY_INTERACTIVE)
    assert own.priority == common_pb2.PRIORITY_INTERACTIVE


def test_n_defaults_to_one_and_is_bounded():
    assert translate().n == 1 and translate(n=16).n == 16
    for bad in (-1, 17):
        with pytest.raises(PipelineError) as err:
            translate(n=bad)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "n:" in err.value.message


@pytest.mark.parametrize("bad", ["\u00b7\u00ac\u00ff\x02", "has space", "x" * 129, "tab\t"])
def test_a_request_id_that_cannot_travel_as_a_header_is_invalid(bad: str):
    """Found by the fuzzer: a non-ASCII id failed inside grpc as the worker call's
    x-request-id, and the client heard nothing until its deadline."""
    assert translate(request_id="req-1.a_b:c").request_id == "req-1.a_b:c"
    with pytest.raises(PipelineError) as err:
        translate(request_id=bad)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.message.startswith("request_id:")


def test_an_unknown_priority_is_invalid():
    with pytest.raises(PipelineError) as err:
        translate(priority=7)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "priority" in err.value.message


def whole(n: int, params: common_pb2.SamplingParams) -> generation_pb2.GenerateResponse:
    worker = FakeWorker([tokens(1, logprobs=True), tokens(2, logprobs=True),
                         tokens(5, finish=LENGTH, usage=USAGE, logprobs=True)])
    pipeline = build_pipeline(tokenizer=FakeTokenizer(), worker=worker,  # type: ignore[arg-type]
                              rpc_timeout_s=1.0, detokenizers=FakeDetokenizers())
    req = translate(params=params, n=n)
    return asyncio.run(generate_whole(pipeline, req, timeout_s=5.0))


def test_a_whole_answer_has_its_tokens_logprobs():
    reply = whole(1, common_pb2.SamplingParams(return_logprobs=True))
    assert reply.text == "Hello!" and reply.finish_reason == LENGTH
    assert list(reply.logprobs) == [output_logprob(1), output_logprob(2), output_logprob(5)]
    assert reply.usage == USAGE and not reply.choices


def test_n_choices_each_whole_the_first_at_the_top_and_the_usage_summed():
    reply = whole(3, common_pb2.SamplingParams(logprobs=2))
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        assert choice.text == "Hello!" and choice.finish_reason == LENGTH
        assert list(choice.logprobs) == [output_logprob(t, 2) for t in (1, 2, 5)]
        assert choice.usage == USAGE
    assert (reply.text, reply.finish_reason) == ("Hello!", LENGTH)
    assert list(reply.logprobs) == list(reply.choices[0].logprobs)
    assert reply.usage == common_pb2.Usage(prompt_tokens=2, completion_tokens=9,
                                           cached_prompt_tokens=1)
