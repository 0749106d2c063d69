"""Constraints checked up front (no tokenizer), and the matchers the core keeps per request
(the default model's tokenizer, no weights): masks, the end token, caching, padding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from services.worker.engine import structured_output
from services.worker.engine.grammar import close_objects, grammar_of
from services.worker.engine.params import Constraint, ConstraintKind, InvalidRequestError
from services.worker.engine.structured_output import Rejection, StructuredOutput
from tests.services.worker.engine.json_schemas import INSTANCES, SCHEMAS

VOCAB = 49152
EOS = 2  # <|im_end|>


def schema(value: object, *, strict: bool = True) -> Constraint:
    return Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(value), strict=strict)


@pytest.mark.parametrize(("constraint", "message"), [
    (Constraint(ConstraintKind.JSON_SCHEMA, "{"),
     "the json_schema is not JSON: Expecting property name enclosed in double quotes: "
     "line 1 column 2 (char 1)"),
    (Constraint(ConstraintKind.JSON_SCHEMA, "[1]"),
     "the json_schema must be a JSON object, got list"),
    (schema({"type": "array", "uniqueItems": True}),
     'the json_schema is invalid: Unimplemented keys: ["uniqueItems"]'),
    (schema({"type": "objectx"}), "the json_schema is invalid: Invalid type: objectx"),
    (schema({"$ref": "#/$defs/nope"}),
     "the json_schema is invalid: Pointer '/$defs/nope' does not exist"),
    (Constraint(ConstraintKind.REGEX, "(["),
     'the regex is invalid: invalid regex "([" (in regex): regex parse error: ([ error: '
     "unclosed character class"),
    (Constraint(ConstraintKind.REGEX, ""), "the regex is empty"),
    (Constraint(ConstraintKind.GRAMMAR, 'start: "a" | x\n'),
     'the grammar is invalid: at 1(8): unknown name: "x"'),
    (Constraint(ConstraintKind.GRAMMAR, "  "), "the grammar is empty"),
])
def test_bad_constraints_are_refused_naming_the_field(constraint, message):
    with pytest.raises(InvalidRequestError) as err:
        grammar_of(constraint)
    assert err.value.field == "constraint"
    assert str(err.value) == f"constraint: {message}"


def test_a_lenient_schema_ignores_what_it_cannot_enforce():
    grammar_of(schema({"type": "array", "uniqueItems": True}, strict=False))


@pytest.mark.parametrize("constraint", [
    Constraint(ConstraintKind.JSON_OBJECT),
    *(schema(s) for s in SCHEMAS.values()),
    Constraint(ConstraintKind.REGEX, r"(yes|no)"),
    Constraint(ConstraintKind.GRAMMAR,
               'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"\n'),
    Constraint(ConstraintKind.GRAMMAR, 'root ::= "yes" | "no"'),  # GBNF
])
def test_good_constraints_are_accepted(constraint):
    assert grammar_of(constraint)


def test_strict_mode_closes_every_object_that_says_nothing_of_other_properties():
    given = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
            "open": {"type": "object", "additionalProperties": True},
            "list": {"type": "array", "items": {"properties": {"c": {"type": "string"}}}},
            "properties": {"type": "string"},  # a property named like the keyword
        },
        "$defs": {"d": {"type": "object"}},
        "anyOf": [{"type": "object"}, {"type": "string"}],
        "allOf": [{"properties": {"x": {"type": "integer"}}}],
    }
    closed = close_objects(given)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert closed["properties"]["list"]["items"]["additionalProperties"] is False
    assert closed["properties"]["properties"] == {"type": "string"}
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert closed["anyOf"] == [{"type": "object", "additionalProperties": False},
                               {"type": "string"}]
    assert "additionalProperties" not in closed["allOf"][0]  # merged with its siblings
    assert "additionalProperties" not in given  # the caller's schema is not changed


# -- matchers on the real tokenizer ---------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def structured(model_dir: Path, **overrides: object) -> StructuredOutput:
    options: dict[str, object] = {"vocab_size": VOCAB, "eos_token_ids": (EOS,)}
    options.update(overrides)
    return StructuredOutput(model_dir / "tokenizer.json", **options)  # type: ignore[arg-type]


def ready(so: StructuredOutput, request_id: str, constraint: Constraint) -> None:
    so.start(request_id, constraint)
    while so.num_building:
        so.wait(1.0)
        so.take_ready()


def is_allowed(so: StructuredOutput, request_id: str, token_id: int) -> bool:
    mask = so.bitmask([request_id])
    assert mask is not None and mask.rows == [0]
    return bool((int(mask.bits[0, token_id // 32]) >> (token_id % 32)) & 1)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_the_end_token_is_allowed_only_once_the_json_is_complete(model_dir, tokenizer, name):
    so = structured(model_dir)
    ready(so, "r", schema(SCHEMAS[name]))
    for token in tokenizer.encode(json.dumps(INSTANCES[name])).ids:
        assert is_allowed(so, "r", token)
        assert not is_allowed(so, "r", EOS)
        assert not so.is_finished("r")
        assert so.accept("r", token) is None  # accepted
    assert so.is_finished("r")  # a closed object allows nothing more


def test_a_completed_value_that_may_go_on_allows_the_end_and_more(model_dir, tokenizer):
    so = structured(model_dir)
    ready(so, "r", Constraint(ConstraintKind.REGEX, r"[0-9]+"))
    for token in tokenizer.encode("42").ids:
        assert so.accept("r", token) is None
    assert is_allowed(so, "r", EOS) and is_allowed(so, "r", tokenizer.token_to_id("7"))
    assert not so.is_finished("r")
    assert so.accept("r", EOS) is None and so.is_finished("r")


def test_a_token_the_grammar_cannot_take_is_rejected(model_dir, tokenizer):
    so = structured(model_dir)
    ready(so, "r", Constraint(ConstraintKind.JSON_OBJECT))
    hello = tokenizer.token_to_id("hello")
    assert not is_allowed(so, "r", hello)
    # Outside the mask it was sampled under: our bug, not the request's.
    assert so.accept("r", hello) == Rejection(
        f"the constraint's grammar rejected token {hello}, which its mask did not allow",
        allowed_by_mask=False)


def test_rows_without_a_matcher_get_no_mask(model_dir):
    so = structured(model_dir)
    ready(so, "json", Constraint(ConstraintKind.JSON_OBJECT))
    ready(so, "regex", Constraint(ConstraintKind.REGEX, "a+"))
    assert so.bitmask(["free"]) is None
    mask = so.bitmask(["free", "json", "other", "regex"])
    assert mask is not None and mask.rows == [1, 3]
    assert tuple(mask.bits.shape) == (2, VOCAB // 32)
    so.release("json")  # finished: its row is free again
    mask = so.bitmask(["free", "json", "other", "regex"])
    assert mask is not None and mask.rows == [3]


def test_a_padded_vocabulary_bans_the_padding(model_dir):
    so = structured(model_dir, vocab_size=VOCAB + 100)  # logits wider than the tokenizer
    ready(so, "r", Constraint(ConstraintKind.REGEX, ".*"))
    mask = so.bitmask(["r"])
    assert mask is not None and tuple(mask.bits.shape) == (1, -(-(VOCAB + 100) // 32))
    assert is_allowed(so, "r", 600) and not any(is_allowed(so, "r", t)
                                                for t in range(VOCAB, VOCAB + 100))


def test_equal_constraints_share_one_grammar_in_an_lru_cache(model_dir, tokenizer):
    so = structured(model_dir, max_cached_matchers=2)
    a, b, c = (Constraint(ConstraintKind.REGEX, r) for r in ("a+", "b+", "c+"))
    for rid, constraint in (("1", a), ("2", a), ("3", b), ("4", a), ("5", c)):
        ready(so, rid, constraint)
    assert so.cached_constraints == [a, c]  # b was used least recently
    # Each request has its own matcher: advancing one leaves the other at the start.
    token_a = tokenizer.token_to_id("a")
    assert so.accept("1", token_a) is None and so.accept("1", token_a) is None
    assert is_allowed(so, "1", EOS)
    assert is_allowed(so, "2", token_a) and not is_allowed(so, "2", EOS)


def test_a_grammar_that_fails_to_build_fails_its_request_only(model_dir, monkeypatch):
    bad = Constraint(ConstraintKind.REGEX, "b+")

    def build(constraint: Constraint) -> str:
        if constraint == bad:  # as a grammar past llguidance's limits would
            raise ValueError("the lexer ran out of fuel")
        return grammar_of(constraint)

    monkeypatch.setattr(structured_output, "grammar_of", build)
    so = structured(model_dir)
    so.start("bad", bad)
    so.start("good", Constraint(ConstraintKind.REGEX, "a+"))
    ready_ids: list[str] = []
    failed: dict[str, str] = {}
    while so.num_building:
        so.wait(1.0)
        got, lost = so.take_ready()
        ready_ids += got
        failed.update(lost)
    assert ready_ids == ["good"]
    assert list(failed) == ["bad"]
    assert failed["bad"] == ("the constraint's grammar failed to build: the lexer ran out of "
                             "fuel")


def test_without_a_tokenizer_constraints_are_refused():
    so = StructuredOutput(None, vocab_size=VOCAB, eos_token_ids=(EOS,))
    assert not so.is_available
    with pytest.raises(InvalidRequestError, match=r"no tokenizer\.json"):
        so.start("r", Constraint(ConstraintKind.JSON_OBJECT))
