"""Request checks: each bad input raises InvalidRequestError naming its field."""

from __future__ import annotations

import math

import pytest

from services.worker.engine.config import EngineConfig
from services.worker.engine.core import EngineCore
from services.worker.engine.params import (
    Constraint,
    ConstraintKind,
    InvalidRequestError,
    SamplingParams,
    validate_prompt,
)

VOCAB = 49152  # the smollm2-135m preset's, so the engine tests reuse the same cases
MAX_LEN = 64

BAD_PARAMS = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.0}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 21}, "logprobs"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"stop_token_ids": (5, VOCAB)}, "stop_token_ids"),
    ({"stop_token_ids": (-1,)}, "stop_token_ids"),
    ({"presence_penalty": 2.01}, "presence_penalty"),
    ({"frequency_penalty": math.nan}, "frequency_penalty"),
    ({"logit_bias": ((VOCAB, 1.0),)}, "logit_bias"),
    ({"logit_bias": ((1, 100.5),)}, "logit_bias"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"constraint": Constraint(ConstraintKind.REGEX, "([")}, "constraint"),
]

# Each new knob's exact message.
MESSAGES = [
    ({"presence_penalty": -2.5}, "presence_penalty: must be in [-2, 2], got -2.5"),
    ({"frequency_penalty": 3.0}, "frequency_penalty: must be in [-2, 2], got 3.0"),
    ({"frequency_penalty": math.inf}, "frequency_penalty: must be in [-2, 2], got inf"),
    ({"logit_bias": ((-1, 1.0),)},
     f"logit_bias: token id -1 is outside the vocabulary [0, {VOCAB})"),
    ({"logit_bias": ((7, 1.0), (7, 2.0))}, "logit_bias: token id 7 appears twice"),
    ({"logit_bias": ((7, -101.0),)},
     "logit_bias: the bias of token 7 must be in [-100, 100], got -101.0"),
    ({"logit_bias": ((7, math.nan),)},
     "logit_bias: the bias of token 7 must be in [-100, 100], got nan"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens: must be in [0, max_tokens=4], got 5"),
    ({"min_tokens": -1}, "min_tokens: must be in [0, max_tokens=128], got -1"),
]

BAD_PROMPTS = [
    ([], "empty"),
    ([1] * MAX_LEN, "context"),  # no room left to generate
    ([1, -1, 2], "outside the vocabulary"),
    ([1, VOCAB], "outside the vocabulary"),
]


@pytest.mark.parametrize(("overrides", "field"), BAD_PARAMS)
def test_bad_params_name_their_field(overrides, field):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**overrides).validate(vocab_size=VOCAB)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


def test_defaults_and_edge_values_are_valid():
    SamplingParams().validate(vocab_size=VOCAB)
    SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, min_p=0.0, logprobs=20,
                   seed=2**63 - 1, stop_token_ids=(0, VOCAB - 1)).validate(vocab_size=VOCAB)
    SamplingParams(temperature=2.0, top_k=1, top_p=1e-3, min_p=0.99, repetition_penalty=0.5,
                   logprobs=0, seed=0).validate(vocab_size=VOCAB)


@pytest.mark.parametrize(("overrides", "message"), MESSAGES)
def test_bad_sampling_knobs_say_what_is_allowed(overrides, message):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**overrides).validate(vocab_size=VOCAB)
    assert str(err.value) == message


def test_new_knobs_at_their_limits_are_valid():
    SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0,
                   logit_bias=((0, -100.0), (VOCAB - 1, 100.0)), min_tokens=128,
                   constraint=Constraint(ConstraintKind.JSON_OBJECT)).validate(vocab_size=VOCAB)


def test_params_with_every_knob_pickle():
    # Requests cross to the engine process pickled.
    import pickle

    params = SamplingParams(presence_penalty=0.5, logit_bias=((3, 1.5),), min_tokens=2,
                            constraint=Constraint(ConstraintKind.JSON_SCHEMA, '{"type": "object"}',
                                                  strict=False))
    assert pickle.loads(pickle.dumps(params)) == params


@pytest.mark.parametrize(("prompt_ids", "message"), BAD_PROMPTS)
def test_bad_prompts_name_prompt_ids(prompt_ids, message):
    with pytest.raises(InvalidRequestError, match=message) as err:
        validate_prompt(prompt_ids, vocab_size=VOCAB, max_model_len=MAX_LEN)
    assert err.value.field == "prompt_ids"


def test_prompt_may_leave_exactly_one_token_to_generate():
    validate_prompt([0, VOCAB - 1] + [1] * (MAX_LEN - 3), vocab_size=VOCAB,
                    max_model_len=MAX_LEN)


@pytest.fixture(scope="module")
def core() -> EngineCore:
    return EngineCore(EngineConfig(model="smollm2-135m", load_format="dummy", dtype="float32",
                                   num_kv_blocks=64))


def test_engine_context_is_capped_by_the_block_pool(core):
    assert core.max_model_len == 64 * 16  # the preset's 8192 does not fit 64 blocks of 16


@pytest.mark.parametrize(("prompt_ids", "field"), [
    ([], "prompt_ids"),
    ([1] * 1024, "prompt_ids"),
    ([1, -1], "prompt_ids"),
    ([1, VOCAB], "prompt_ids"),
])
def test_make_request_rejects_bad_prompts(core, prompt_ids, field):
    with pytest.raises(InvalidRequestError) as err:
        core.make_request("r", prompt_ids, SamplingParams())
    assert err.value.field == field
    assert not core.has_work()


@pytest.mark.parametrize(("overrides", "field"), BAD_PARAMS)
def test_make_request_rejects_bad_params(core, overrides, field):
    with pytest.raises(InvalidRequestError) as err:
        core.make_request("r", [1, 2, 3], SamplingParams(**overrides))
    assert err.value.field == field
    assert not core.has_work()


def test_a_model_without_a_tokenizer_refuses_constraints(core):
    with pytest.raises(InvalidRequestError) as err:
        core.make_request("r", [1, 2], SamplingParams(
            constraint=Constraint(ConstraintKind.JSON_OBJECT)))
    assert str(err.value) == ("constraint: this model has no tokenizer.json, so constraints "
                              "cannot be enforced")


def test_make_request_rejects_an_empty_request_id(core):
    with pytest.raises(InvalidRequestError) as err:
        core.make_request("", [1, 2, 3], SamplingParams())
    assert err.value.field == "request_id"


def test_make_request_builds_but_does_not_queue(core):
    params = SamplingParams(max_tokens=4, stop_token_ids=(VOCAB - 1,))
    req = core.make_request("ok", [1] * 1023, params, cache_salt="tenant-a")
    assert (req.request_id, req.num_prompt_tokens, req.params, req.cache_salt) == (
        "ok", 1023, params, "tenant-a")
    assert not core.has_work()
