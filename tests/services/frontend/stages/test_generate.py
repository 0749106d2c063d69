"""The generate stage over a fake worker: the events of its stream, the one token count,
the request and routing headers it sends, and its errors."""

from __future__ import annotations

import grpc
import pytest

from genmesh.core import metadata
from genmesh.core.models.chat_template import ChatMessage
from genmesh.v1 import common_pb2
from services.frontend.errors import PipelineError
from services.frontend.events import Finished, Started
from services.frontend.routing import Affinity
from services.frontend.stages.call import StageEvent
from services.frontend.stages.generate import Generate
from tests.services.frontend.stages.fakes import (
    FakeWorker,
    call_of,
    collect,
    request,
    rpc_error,
    run,
    tokens,
)

USAGE = common_pb2.Usage(prompt_tokens=2, completion_tokens=3)
PROMPT_IDS = list(range(40))


def generate(worker: FakeWorker) -> Generate:
    return Generate(worker, affinity=Affinity(block_size=16, max_blocks=4),  # type: ignore[arg-type]
                    rpc_timeout_s=1.0)


def test_streams_started_each_worker_message_then_the_finish_and_counts_the_tokens():
    worker = FakeWorker([tokens(1, 2), tokens(3),
                         tokens(4, finish=common_pb2.FINISH_REASON_LENGTH, usage=USAGE)],
                        version="v7")
    call = call_of(request(), prompt_ids=PROMPT_IDS)
    events = run(collect(generate(worker).run(call)))
    assert events == [
        Started("r1", "m", "v7", 40),
        tokens(1, 2), tokens(3),
        tokens(4, finish=common_pb2.FINISH_REASON_LENGTH, usage=USAGE),
        Finished(common_pb2.FINISH_REASON_LENGTH, USAGE)]
    assert (call.tokens.num_prompt, call.tokens.num_generated) == (40, 4)
    assert call.observer.num_tokens == [2, 1, 1]  # type: ignore[attr-defined]
    assert worker.calls[0].is_cancelled  # released however it ended


def test_the_worker_request_drops_stop_strings_and_carries_routing_headers():
    worker = FakeWorker([tokens(finish=common_pb2.FINISH_REASON_STOP)])
    params = common_pb2.SamplingParams(max_tokens=8, stop=["\n"], temperature=0.5)
    call = call_of(request(params=params, model_version="v2", is_version_routed=True),
                   prompt_ids=PROMPT_IDS)
    run(collect(generate(worker).run(call)))
    sent = worker.requests[0]
    assert sent.request_id.startswith("r1.") and len(sent.request_id) == 9
    assert list(sent.prompt_ids) == PROMPT_IDS
    assert sent.params == common_pb2.SamplingParams(max_tokens=8, temperature=0.5)
    assert sent.cache_salt == "acme"
    headers = worker.metadata[0]
    assert headers[metadata.REQUEST_ID] == "r1"
    assert headers[metadata.ROUTED_VERSION] == "v2"
    assert metadata.MODEL_VERSION not in headers
    assert metadata.PREFIX_KEY in headers and metadata.AB_BUCKET in headers


@pytest.mark.parametrize(("asked", "sent"), [
    (dict(return_logprobs=True), dict(logprobs=1)),  # the worker reports none without one
    (dict(return_logprobs=True, logprobs=3), dict(logprobs=3)),
    (dict(logprobs=2), dict(logprobs=2)),
])
def test_the_worker_is_asked_for_the_logprobs_the_client_wants(asked, sent):
    worker = FakeWorker([tokens(finish=common_pb2.FINISH_REASON_STOP)])
    call = call_of(request(params=common_pb2.SamplingParams(max_tokens=8, **asked)),
                   prompt_ids=PROMPT_IDS)
    run(collect(generate(worker).run(call)))
    assert worker.requests[0].params == common_pb2.SamplingParams(max_tokens=8, **sent)
    assert call.prefilled.is_set()


def test_a_chat_s_started_carries_the_conversation_as_sent():
    conversation = (ChatMessage("user", "hi [redacted]"),)
    req = request(prompt=None, messages=conversation)
    worker = FakeWorker([tokens(finish=common_pb2.FINISH_REASON_STOP)])
    events = run(collect(generate(worker).run(call_of(req, prompt_ids=[1]))))
    assert events[0] == Started("r1", "m", "v1", 1, conversation)


def test_routed_version_asks_the_same_route_for_its_stats():
    worker = FakeWorker([], routed_version="v9")
    call = call_of(request(model_version=""), prompt_ids=[1, 2])
    assert run(generate(worker).routed_version(call)) == "v9"
    assert worker.metadata == [{metadata.REQUEST_ID: "r1", metadata.AB_BUCKET:
                                worker.metadata[0][metadata.AB_BUCKET]}]


def test_a_frontend_serving_one_version_routes_to_it_without_asking():
    worker = FakeWorker([], routed_version="v9")
    stage = Generate(worker, affinity=Affinity(block_size=16, max_blocks=4),  # type: ignore[arg-type]
                     rpc_timeout_s=1.0, versions=("v1",))
    worker.stats_error = rpc_error(grpc.StatusCode.UNAVAILABLE, "no healthy upstream")
    call = call_of(request(model_version=""), prompt_ids=[1, 2])
    assert run(stage.routed_version(call)) == "v1"  # no worker up: still known
    assert worker.metadata == []  # no stats call
    two = Generate(worker, affinity=Affinity(block_size=16, max_blocks=4),  # type: ignore[arg-type]
                   rpc_timeout_s=1.0, versions=("v1", "v2"))
    worker.stats_error = None
    assert run(two.routed_version(call)) == "v9"  # a split: the gateway is asked
    assert len(worker.metadata) == 1


def test_while_no_worker_answers_the_splits_last_answer_stands_in_for_a_minute():
    now = [100.0]
    worker = FakeWorker([], routed_version="v9")
    stage = Generate(worker, affinity=Affinity(block_size=16, max_blocks=4),  # type: ignore[arg-type]
                     rpc_timeout_s=1.0, clock=lambda: now[0])
    call = call_of(request(model_version=""), prompt_ids=[1, 2])
    worker.stats_error = rpc_error(grpc.StatusCode.UNAVAILABLE, "no healthy upstream")
    with pytest.raises(PipelineError) as never_answered:  # nothing to stand in yet
        run(stage.routed_version(call))
    assert never_answered.value.code is grpc.StatusCode.UNAVAILABLE
    worker.stats_error = None
    assert run(stage.routed_version(call)) == "v9"
    worker.stats_error = rpc_error(grpc.StatusCode.UNAVAILABLE, "no healthy upstream")
    now[0] += 59.0
    assert run(stage.routed_version(call)) == "v9"  # the cache can still answer
    now[0] += 2.0
    with pytest.raises(PipelineError):
        run(stage.routed_version(call))
    worker.stats_error = rpc_error(grpc.StatusCode.PERMISSION_DENIED, "rbac")
    now[0] = 100.0
    with pytest.raises(PipelineError) as denied:  # not an outage: no stand-in
        run(stage.routed_version(call))
    assert denied.value.code is grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(("worker", "code", "words"), [
    (FakeWorker([tokens(1), tokens(finish=common_pb2.FINISH_REASON_ERROR, error="oom")]),
     grpc.StatusCode.INTERNAL, "generation failed: oom"),
    (FakeWorker([tokens(1)]), grpc.StatusCode.UNAVAILABLE, "ended without a finish"),
    (FakeWorker([tokens(1)], error=rpc_error(grpc.StatusCode.UNAVAILABLE, "no healthy upstream")),
     grpc.StatusCode.UNAVAILABLE, "the worker is unavailable (no healthy upstream)"),
    (FakeWorker([], error=rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens < 0")),
     grpc.StatusCode.INVALID_ARGUMENT, "max_tokens < 0"),
])
def test_worker_failures_become_pipeline_errors(worker, code, words):
    call = call_of(prompt_ids=[1])
    seen = []

    async def consume() -> None:
        async for event in generate(worker).run(call):
            seen.append(event)

    with pytest.raises(PipelineError) as err:
        run(consume())
    assert err.value.code == code and words in err.value.message
    assert isinstance(seen[0], Started)
    assert worker.calls[0].is_cancelled


def test_leaving_early_cancels_the_worker_request():
    worker = FakeWorker([tokens(1), tokens(2), tokens(3)])

    async def first_two() -> list[StageEvent]:
        stream = generate(worker).run(call_of(prompt_ids=[1]))
        out = [await anext(stream), await anext(stream)]
        await stream.aclose()
        return out

    assert run(first_two()) == [Started("r1", "m", "v1", 1), tokens(1)]
    assert worker.calls[0].is_cancelled and worker.calls[0].num_read == 1
