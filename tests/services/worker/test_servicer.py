"""The servicer's translation of the SamplingParams proto into the engine's dataclass."""

from __future__ import annotations

import json

from genmesh.v1 import common_pb2
from services.worker.engine.params import Constraint, ConstraintKind, SamplingParams
from services.worker.servicer import params_from_proto


def test_an_empty_proto_means_every_default():
    assert params_from_proto(common_pb2.SamplingParams()) == SamplingParams()


def test_the_new_knobs_are_mapped():
    proto = common_pb2.SamplingParams(presence_penalty=0.5, frequency_penalty=-1.25,
                                      logit_bias={7: -100.0, 3: 2.5}, min_tokens=4)
    params = params_from_proto(proto)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.25)
    assert params.logit_bias == ((3, 2.5), (7, -100.0))  # sorted by token id
    assert params.min_tokens == 4 and params.constraint is None


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
