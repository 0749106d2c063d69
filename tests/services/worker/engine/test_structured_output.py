"""Structured output and the new sampling knobs on the real default model: every output
parses and validates, constrained and free requests share steps, async scheduling gives
the synchronous engine's tokens, and a request whose grammar is still building can be
aborted."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from tokenizers import Tokenizer

from genmesh.core.models.chat_template import ChatMessage, ChatTemplate, load_chat_template
from services.worker.engine.config import EngineConfig
from services.worker.engine.core import EngineCore
from services.worker.engine.outputs import Delta, FinishReason
from services.worker.engine.params import Constraint, ConstraintKind, SamplingParams
from tests.services.worker.engine.helpers import run_core
from tests.services.worker.engine.json_schemas import SCHEMAS

MAX_TOKENS = 256  # every schema's longest valid output fits (bounded strings and arrays)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def chat(model_dir: Path, tokenizer: Tokenizer):  # type: ignore[no-untyped-def]
    source = load_chat_template(model_dir)
    assert source is not None
    template = ChatTemplate(source)

    def prompt(text: str) -> list[int]:
        rendered = template.render([ChatMessage(role="user", content=text)])
        return tokenizer.encode(rendered, add_special_tokens=False).ids

    return prompt


def make_core(model_dir: Path, **overrides: object) -> EngineCore:
    options: dict[str, object] = {"model": str(model_dir), "dtype": "bfloat16",
                                  "num_kv_blocks": 2048, "max_num_seqs": 64,
                                  "max_num_batched_tokens": 1024}
    options.update(overrides)
    return EngineCore(EngineConfig(**options))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def core(model_dir: Path) -> EngineCore:
    return make_core(model_dir)


def text_of(tokenizer: Tokenizer, deltas: list[Delta]) -> str:
    return tokenizer.decode([t for d in deltas for t in d.new_token_ids])


def schema_requests(chat, num_per_schema: int) -> dict[str, tuple[list[int], SamplingParams]]:  # type: ignore[no-untyped-def]
    """num_per_schema generations under each schema, each with its own seed and
    temperature (greedy for the first)."""
    requests = {}
    for name, schema in SCHEMAS.items():
        constraint = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema))
        for i in range(num_per_schema):
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.3 * (i % 4),
                                    seed=i, constraint=constraint)
            prompt = chat(f"Describe example number {i} of a {name} as JSON.")
            requests[f"{name}-{i}"] = (prompt, params)
    return requests


def check_all_valid(tokenizer: Tokenizer, outputs: dict[str, list[Delta]]) -> None:
    invalid = {}
    for rid, deltas in outputs.items():
        name = rid.rsplit("-", 1)[0]
        text = text_of(tokenizer, deltas)
        try:
            assert deltas[-1].finish_reason is FinishReason.STOP, deltas[-1].finish_reason
            jsonschema.validate(json.loads(text), SCHEMAS[name])
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            invalid[rid] = (text, str(exc)[:200])
    assert not invalid, invalid


def test_ten_generations_under_ten_schemas_all_validate(core, chat, tokenizer):
    check_all_valid(tokenizer, run_core(core, schema_requests(chat, 1)))


@pytest.mark.slow
def test_two_hundred_generations_under_ten_schemas_all_validate(core, chat, tokenizer):
    check_all_valid(tokenizer, run_core(core, schema_requests(chat, 20)))


def test_regex_grammar_and_json_object_share_a_step_with_free_text(core, chat, tokenizer):
    lark = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"\n'
    requests = {
        "regex": (chat("Is the sky blue?"), SamplingParams(
            max_tokens=16, constraint=Constraint(ConstraintKind.REGEX, r"(yes|no)"))),
        "lark": (chat("Is water wet?"), SamplingParams(
            max_tokens=16, constraint=Constraint(ConstraintKind.GRAMMAR, lark))),
        "gbnf": (chat("Pick a colour."), SamplingParams(
            max_tokens=16, constraint=Constraint(ConstraintKind.GRAMMAR,
                                                 'root ::= "red" | "green" | "blue"'))),
        # Any JSON object is unbounded: a small model may ramble past max_tokens on an
        # open-ended prompt (LENGTH, cut JSON), so this one asks for a short object.
        "json": (chat("Give the name and age of a person as JSON."), SamplingParams(
            max_tokens=128, constraint=Constraint(ConstraintKind.JSON_OBJECT))),
        "free": (chat("Say hello."), SamplingParams(max_tokens=8, ignore_eos=True)),
    }
    out = run_core(core, requests)
    texts = {rid: text_of(tokenizer, ds) for rid, ds in out.items()}
    assert texts["regex"] in ("yes", "no")
    assert re.fullmatch(r"The answer is (yes|no)\.", texts["lark"])
    assert texts["gbnf"] in ("red", "green", "blue")
    assert isinstance(json.loads(texts["json"]), dict)
    assert sum(len(d.new_token_ids) for d in out["free"]) == 8
    assert all(out[rid][-1].finish_reason is FinishReason.STOP for rid in requests
               if rid != "free")


MIX = {
    # Sampled under a schema of enums, a nested object and an array (~50 tokens: the
    # longest request of the mix sets how many steps it takes).
    "schema": ("Describe some settings as JSON.", SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.7, seed=5,
        constraint=Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMAS["settings"])))),
    "greedy-json": ("Describe a person as JSON.", SamplingParams(
        max_tokens=MAX_TOKENS,
        constraint=Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMAS["person"])))),
    "penalties": ("Write a list of fruits.", SamplingParams(
        max_tokens=24, ignore_eos=True, presence_penalty=0.8, frequency_penalty=0.6)),
    "bias": ("Count to ten.", SamplingParams(max_tokens=12, min_tokens=12,
                                             logit_bias=((28, 3.0),))),
    "free": ("Tell me a joke.", SamplingParams(max_tokens=20, temperature=0.9, seed=3)),
}


def summary(tokenizer: Tokenizer, out: dict[str, list[Delta]]) -> dict[str, tuple]:
    return {rid: (text_of(tokenizer, ds), ds[-1].finish_reason, ds[-1].usage)
            for rid, ds in out.items()}


def test_async_scheduling_gives_the_synchronous_engines_outputs(model_dir, chat, tokenizer):
    requests = {rid: (chat(text), params) for rid, (text, params) in MIX.items()}
    sync = summary(tokenizer, run_core(make_core(model_dir, async_scheduling=False), requests))
    got = summary(tokenizer, run_core(make_core(model_dir, async_scheduling=True), requests))
    assert got == sync
    jsonschema.validate(json.loads(got["schema"][0]), SCHEMAS["settings"])
    assert got["bias"][2] is not None and got["bias"][2].completion_tokens == 12


@pytest.mark.slow  # ~20 s in float32; run with -m slow
def test_preempted_constrained_requests_resume_where_their_grammar_was(model_dir, chat,
                                                                        tokenizer):
    # Greedy, fp32: the same tokens whether or not a request was preempted and recomputed.
    # Four requests of ~100 tokens each in a pool of 256 tokens.
    requests = {rid: r for rid, r in schema_requests(chat, 1).items()
                if rid.startswith(("order", "forecast", "recipe", "team"))}
    roomy = make_core(model_dir, dtype="float32")
    want = summary(tokenizer, run_core(roomy, requests))
    tight = make_core(model_dir, dtype="float32", num_kv_blocks=16)
    got = summary(tokenizer, run_core(tight, requests))
    assert tight.stats().num_preemptions > 0
    assert got == want
    for rid, (text, reason, _) in got.items():
        assert reason is FinishReason.STOP
        jsonschema.validate(json.loads(text), SCHEMAS[rid.rsplit("-", 1)[0]])


def test_a_bias_of_100_forces_its_token(core, chat, tokenizer):
    token = tokenizer.token_to_id("Paris")
    out = run_core(core, {"r": (chat("Hi"), SamplingParams(max_tokens=5,
                                                           logit_bias=((token, 100.0),)))})
    assert [t for d in out["r"] for t in d.new_token_ids] == [token] * 5


def test_min_tokens_holds_off_the_end(core, chat, tokenizer):
    prompt = chat("Reply with one word: yes or no?")
    free = run_core(core, {"r": (prompt, SamplingParams(max_tokens=40))})["r"]
    ended_early = sum(len(d.new_token_ids) for d in free)
    assert free[-1].finish_reason is FinishReason.STOP and ended_early < 10
    held = run_core(core, {"r": (prompt, SamplingParams(max_tokens=40, min_tokens=10))})["r"]
    tokens = [t for d in held for t in d.new_token_ids]
    assert len(tokens) >= 10 and 2 not in tokens[:-1]  # <|im_end|> only as the last, if at all


def test_a_request_aborted_while_its_grammar_builds_ends_cleanly(model_dir, chat):
    eng = make_core(model_dir)
    params = SamplingParams(constraint=Constraint(ConstraintKind.JSON_SCHEMA,
                                                  json.dumps(SCHEMAS["order"])))
    eng.add(eng.make_request("r", chat("An order as JSON."), params))
    assert eng.has_work()
    final = eng.abort("r")
    assert final is not None and final.finish_reason is FinishReason.ABORT
    assert not eng.has_work()
    assert eng.structured.bitmask(["r"]) is None


def test_a_constraint_the_vocabulary_cannot_write_is_the_requests_fault(core):
    # U+40000 is F1 80 80 80 in UTF-8; no token of SmolLM2's vocabulary holds byte F1, and
    # llguidance's mask then allows a token its parser refuses.
    out = run_core(core, {"r": ([1, 2, 3, 4], SamplingParams(
        max_tokens=8, constraint=Constraint(ConstraintKind.REGEX, "\U00040000")))})
    last = out["r"][-1]
    assert last.finish_reason is FinishReason.ERROR
    assert last.invalid_field == "constraint"
    assert last.error == ("the constraint asks for text this model's vocabulary cannot write "
                          "(its grammar needs bytes that no token of the vocabulary holds)")
    assert [t for d in out["r"] for t in d.new_token_ids] == []  # the refused token unsent
    assert not core.has_work()
