"""Oversized requests end to end (the session's ``mesh``: real Envoy, frontend, tokenizer,
safety and worker processes), called through Envoy's edge: a chat over the deployment's
limits is refused before any service works on it, one within them but over the model's
context is refused once its tokens are known, and neither troubles the next request."""

from __future__ import annotations

import math
import time

import grpc
import pytest

from genmesh.client.types import DEV_API_KEY
from genmesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc

METADATA = (("x-api-key", DEV_API_KEY),)


@pytest.fixture(scope="module")
def stub(mesh):
    with grpc.insecure_channel(mesh.edge_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        stub.ListModels(generation_pb2.ListModelsRequest(), metadata=METADATA, timeout=60)
        yield stub  # connected: the timings below are the calls' own


def chat(contents: list[str]) -> generation_pb2.GenerateRequest:
    """A conversation ending with the user's turn, alternating user and assistant."""
    return generation_pb2.GenerateRequest(
        chat=generation_pb2.ChatTurnList(messages=[
            generation_pb2.Message(role="user" if (len(contents) - i) % 2 else "assistant",
                                   content=c) for i, c in enumerate(contents)]),
        params=common_pb2.SamplingParams(max_tokens=4), skip_cache=True)


def timed_error(stub, request) -> tuple[grpc.RpcError, float]:
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request, metadata=METADATA, timeout=60)
    return err.value, time.perf_counter() - started


def served(stub) -> int:
    reply = stub.Generate(generation_pb2.GenerateRequest(
        prompt="Say hello.", params=common_pb2.SamplingParams(max_tokens=4), skip_cache=True),
        metadata=METADATA, timeout=60)
    return reply.usage.completion_tokens


def test_a_2000_message_chat_is_refused_within_100_ms_and_the_next_is_served(stub):
    error, seconds = timed_error(stub, chat([f"message {i:05d} ok" for i in range(2000)]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "this chat has 2000 messages; the limit is 512 (limits.max_chat_messages)")
    assert seconds < 0.1, seconds
    assert served(stub) == 4


def test_a_chat_within_the_limits_but_over_the_context_is_refused_in_bounded_time(stub):
    context = stub.ListModels(generation_pb2.ListModelsRequest(), metadata=METADATA,
                              timeout=30).models[0].max_model_len
    # 500 messages (250 prompt checks, one template render) of a few words each, with
    # more tokens together than the model's context holds.
    words = math.ceil(context / 500) + 2
    error, seconds = timed_error(stub, chat([" ".join(["word"] * words)] * 500))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"the model's context is {context} tokens" in (error.details() or "")
    assert seconds < 5.0, seconds
    assert served(stub) == 4
