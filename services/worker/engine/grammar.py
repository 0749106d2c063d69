"""A constraint as the text of an llguidance grammar, checked once per distinct constraint.

No tokenizer is needed here, so whoever validates a request (the worker's serving side,
before queueing it) refuses a bad schema, regex or grammar with an error naming the
field; the engine core then builds the token-level matcher (see structured_output.py).

Why llguidance: measured against xgrammar and outlines-core on SmolLM2's tokenizer, it
was the only one of the three whose every output was valid JSON satisfying the schema
(xgrammar let raw control characters and cut UTF-8 sequences into strings; outlines-core
ignored ``minimum``/``maximum`` and took up to a second per schema to compile); it
rejects keywords it cannot enforce instead of silently ignoring them, and building a
grammar takes under a millisecond (its masks are computed lazily).
"""

from __future__ import annotations

import functools
import json
import re
from typing import TYPE_CHECKING, Any

from services.worker.engine.params import Constraint, ConstraintKind, InvalidRequestError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# The JSON layout every JSON constraint generates: json.dumps's default separators and
# no other whitespace (flexible whitespace lets a small model loop on newlines).
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
}
NUM_CACHED_GRAMMARS = 256  # distinct constraints whose grammar text is kept

# Keywords whose value is one subschema, a list of them, or a name -> subschema map.
_SUBSCHEMA = ("additionalProperties", "items", "additionalItems", "unevaluatedItems",
              "contains", "not", "if", "then", "else", "propertyNames")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions",
                   "dependentSchemas")


@functools.lru_cache(maxsize=NUM_CACHED_GRAMMARS)
def grammar_of(constraint: Constraint) -> str:
    """The llguidance grammar text of ``constraint``; raises InvalidRequestError
    ("constraint") when it is malformed or asks for what cannot be enforced."""
    import llguidance

    kind = constraint.kind
    if kind is ConstraintKind.JSON_OBJECT:
        grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                                overrides=JSON_OPTIONS)
    elif kind is ConstraintKind.JSON_SCHEMA:
        schema = _parse_schema(constraint.spec)
        if constraint.strict:
            schema = close_objects(schema)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, overrides={**JSON_OPTIONS, "lenient": not constraint.strict})
    elif kind is ConstraintKind.REGEX:
        if not constraint.spec:
            raise InvalidRequestError("constraint", "the regex is empty")
        grammar = llguidance.LLMatcher.grammar_from_regex(constraint.spec)
    else:
        if not constraint.spec.strip():
            raise InvalidRequestError("constraint", "the grammar is empty")
        try:  # Lark as it is; GBNF (``::=`` rules) converted to Lark
            grammar = llguidance.grammar_from("grammar", constraint.spec)
        except ValueError as exc:
            raise InvalidRequestError("constraint", f"the grammar is invalid: {exc}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        message = one_line(messages[0])
        if kind is not ConstraintKind.GRAMMAR:  # a position in llguidance's own grammar
            message = _LARK_POSITION.sub("", message)
        raise InvalidRequestError("constraint", f"the {kind.value} is invalid: {message}")
    return grammar


# The source excerpts llguidance adds under an error ("   1 | start: ...", "   ^"), and
# an error's position in the grammar ("at 1(8): ").
_EXCERPT = re.compile(r"^\s*(\d+\s*\|.*|\^+)\s*$")
_LARK_POSITION = re.compile(r"^at \d+\(\d+\): ")


def one_line(message: str) -> str:
    """An llguidance error as one line, without its source excerpts."""
    lines = [line.strip() for line in message.splitlines()
             if line.strip() and not _EXCERPT.match(line)]
    return " ".join(lines)


def _parse_schema(spec: str) -> dict[str, Any]:
    try:
        schema = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError("constraint", f"the json_schema is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidRequestError(
            "constraint", f"the json_schema must be a JSON object, got {type(schema).__name__}")
    return schema


def close_objects(schema: Any, *, in_all_of: bool = False) -> Any:
    """A copy of ``schema`` in which every object schema that says nothing about other
    properties forbids them (``additionalProperties: false``), as strict mode wants.

    Direct members of an ``allOf`` stay open: closing each would forbid the properties
    the others declare.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA:
        if key in out and isinstance(out[key], dict):
            out[key] = close_objects(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [close_objects(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: close_objects(s) for name, s in out[key].items()}
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [close_objects(s, in_all_of=True) for s in out["allOf"]]
    if (_is_object_schema(out) and not in_all_of and "additionalProperties" not in out
            and "unevaluatedProperties" not in out and "patternProperties" not in out):
        out["additionalProperties"] = False
    return out


def _is_object_schema(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    return (kind == "object" or (isinstance(kind, list) and "object" in kind)
            or "properties" in schema)
