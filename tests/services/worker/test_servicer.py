"""The servicer's translation of the SamplingParams proto into the engine's dataclass,
and of the engine's failures into status codes."""

from __future__ import annotations

import asyncio
import json
import types

import grpc
import pytest

from genmesh.v1 import common_pb2, worker_pb2
from services.worker.engine.outputs import Delta, FinishReason
from services.worker.engine.params import Constraint, ConstraintKind, SamplingParams
from services.worker.servicer import WorkerServicer, params_from_proto


def test_an_empty_proto_means_every_default():
    assert params_from_proto(common_pb2.SamplingParams()) == SamplingParams()


def test_the_new_knobs_are_mapped():
    proto = common_pb2.SamplingParams(presence_penalty=0.5, frequency_penalty=-1.25,
                                      logit_bias={7: -100.0, 3: 2.5}, min_tokens=4)
    params = params_from_proto(proto)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.25)
    assert params.logit_bias == ((3, 2.5), (7, -100.0))  # sorted by token id
    assert params.min_tokens == 4 and params.constraint is None


@pytest.mark.parametrize(("given", "want"), [({}, None), ({"speculative": True}, True),
                                             ({"speculative": False}, False)])
def test_speculation_unset_follows_the_worker(given, want):
    assert params_from_proto(common_pb2.SamplingParams(**given)).speculative is want


def with_constraint(**kind: object) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(constraint=common_pb2.Constraint(**kind))  # type: ignore[arg-type]


def test_each_constraint_kind_is_mapped():
    schema = json.dumps({"type": "object"})
    cases = [
        (with_constraint(json_object=common_pb2.JsonObject()),
         Constraint(ConstraintKind.JSON_OBJECT)),
        (with_constraint(json_schema=common_pb2.JsonSchema(schema=schema)),
         Constraint(ConstraintKind.JSON_SCHEMA, schema, strict=True)),  # unset: strict
        (with_constraint(json_schema=common_pb2.JsonSchema(schema=schema, strict=False)),
         Constraint(ConstraintKind.JSON_SCHEMA, schema, strict=False)),
        (with_constraint(regex="[0-9]+"), Constraint(ConstraintKind.REGEX, "[0-9]+")),
        (with_constraint(grammar='start: "a"'), Constraint(ConstraintKind.GRAMMAR, 'start: "a"')),
        (with_constraint(), None),  # a Constraint with no kind is free text
    ]
    for proto, want in cases:
        assert params_from_proto(proto).constraint == want


class _OneDelta:
    """An engine whose stream yields one delta."""

    def __init__(self, delta: Delta) -> None:
        self.delta = delta

    def submit(self, prompt_ids: list[int], params: object, **kwargs: object) -> object:
        delta = self.delta

        class Stream:
            def __aiter__(self) -> Stream:
                self.left = [delta]
                return self

            async def __anext__(self) -> Delta:
                if not self.left:
                    raise StopAsyncIteration
                return self.left.pop()

            async def aclose(self) -> None:
                pass

        return Stream()

    def stats(self) -> object:
        return types.SimpleNamespace(num_running=1)


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def send_initial_metadata(self, md: object) -> None:
        pass

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise _Aborted


def test_a_request_found_at_fault_mid_stream_is_invalid_argument():
    delta = Delta("r", [], finish_reason=FinishReason.ERROR, invalid_field="constraint",
                  error="the constraint asks for text this model's vocabulary cannot write")
    servicer = WorkerServicer(_OneDelta(delta), model_name="m",  # type: ignore[arg-type]
                              model_version="v1")
    context = _Context()

    async def replies() -> list[object]:
        return [r async for r in servicer.Generate(
            worker_pb2.WorkerGenerateRequest(prompt_ids=[1]), context)]  # type: ignore[arg-type]

    with pytest.raises(_Aborted):
        asyncio.run(replies())
    assert context.aborted == (grpc.StatusCode.INVALID_ARGUMENT,
                               "constraint: the constraint asks for text this model's "
                               "vocabulary cannot write")
