"""OpenAI request bodies as the frontend's GenerateRequests.

``chat_request`` reads a ``/v1/chat/completions`` body and ``completion_request`` a
``/v1/completions`` body. Each returns a ``Parsed``: the ``GenerateRequest`` (``n``
choices are the frontend's: each gets its own seed, the request's plus its index, and
they share the prompt's KV blocks) and how to answer (streamed or not, usage in the
stream). Everything a request asks for is either
honoured or refused with a 400 naming the field: an unknown field, a wrong type, a value
out of range, and what this server does not do yet (``echo``, ``suffix``,
``best_of`` > 1) are errors, never silently ignored.

Besides OpenAI's fields, vLLM's sampling extensions are taken too: ``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``; and
genmesh's ``speculative`` (true/false: speculative decoding for this request).

Tools (``tools``, ``tool_choice``, ``tool`` messages and assistant ``tool_calls``) map onto
the GenerateRequest's own fields: the frontend renders them, enforces forced choices and
parses the calls (``services/frontend/tools.py``), for this API and the gRPC one alike.
Here only their JSON shape is checked.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from genmesh.v1 import common_pb2, generation_pb2
from services.httpapi.errors import invalid

INT32_MAX = 2 ** 31 - 1

MAX_N = 16  # choices per request (the frontend's bound)
MAX_TOP_LOGPROBS = 20  # chat: alternatives per token
MAX_COMPLETION_LOGPROBS = 5  # completions: alternatives per token (OpenAI's bound)
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
ROLES = ("system", "developer", "user", "assistant", "tool")
_TOOL_MODES = {"auto": generation_pb2.TOOL_MODE_AUTO, "none": generation_pb2.TOOL_MODE_NONE,
               "required": generation_pb2.TOOL_MODE_REQUIRED}


@dataclass(frozen=True, slots=True)
class Parsed:
    model: str
    request: generation_pb2.GenerateRequest  # with n: the frontend runs the choices
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; 400 otherwise."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


# ---- fields -------------------------------------------------------------------------

class _Fields:
    """Typed access to one body's fields; every read field is marked, so what is left
    unread at the end is unknown to this API."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.body = body
        self.read: set[str] = set()

    def get(self, name: str) -> Any:
        self.read.add(name)
        value = self.body.get(name)
        return value

    def string(self, name: str, *, required: bool = False) -> str | None:
        value = self.get(name)
        if value is None:
            if required:
                raise invalid(f"'{name}' is required", param=name)
            return None
        if not isinstance(value, str):
            raise invalid(f"'{name}' must be a string", param=name)
        return value

    def boolean(self, name: str) -> bool | None:
        value = self.get(name)
        if value is not None and not isinstance(value, bool):
            raise invalid(f"'{name}' must be true or false", param=name)
        return value

    def integer(self, name: str, *, low: int | None = None, high: int | None = INT32_MAX
                ) -> int | None:
        """An integer field; ``high`` defaults to the largest int32, the width of every
        integer of the gRPC API but the seed."""
        value = self.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(f"'{name}' must be an integer", param=name)
        _check_range(name, value, low, high)
        return value

    def number(self, name: str, *, low: float | None = None, high: float | None = None
               ) -> float | None:
        value = self.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                value):
            raise invalid(f"'{name}' must be a number", param=name)
        _check_range(name, value, low, high)
        return float(value)

    def refuse_unknown(self, ignored: frozenset[str] = frozenset()) -> None:
        unknown = sorted(set(self.body) - self.read - ignored)
        if unknown:
            raise invalid(f"unrecognized request argument supplied: {', '.join(unknown)}",
                          param=unknown[0])


def _check_range(name: str, value: float, low: float | None, high: float | None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"between {low} and {high}" if low is not None and high is not None
                  else f">= {low}" if low is not None else f"<= {high}")
        raise invalid(f"'{name}' must be {bounds}, got {value}", param=name)


# Accepted and without effect here: who the end user is, and OpenAI's service tiers and
# storage, which have no meaning on a self-hosted server.
_IGNORED = frozenset({"user", "service_tier", "store", "metadata", "parallel_tool_calls"})


def _not_supported(f: _Fields, name: str, is_set: Callable[[Any], bool],
                   what: str) -> None:
    value = f.get(name)
    if value is not None and is_set(value):
        raise invalid(f"'{name}' is not supported by this server yet: {what}", param=name)


# ---- the shared sampling fields -----------------------------------------------------

def _sampling(f: _Fields, *, default_max_tokens: int) -> common_pb2.SamplingParams:
    p = common_pb2.SamplingParams()
    max_tokens = f.integer("max_completion_tokens", low=1)
    legacy = f.integer("max_tokens", low=1)
    if max_tokens is not None and legacy is not None and max_tokens != legacy:
        raise invalid("set max_completion_tokens or max_tokens, not both",
                      param="max_completion_tokens")
    p.max_tokens = max_tokens or legacy or default_max_tokens
    temperature = f.number("temperature", low=0.0, high=2.0)
    p.temperature = 1.0 if temperature is None else temperature  # OpenAI's default
    if (top_p := f.number("top_p", low=0.0, high=1.0)) is not None:
        if top_p == 0.0:
            raise invalid("'top_p' must be > 0", param="top_p")
        p.top_p = top_p
    if (presence := f.number("presence_penalty", low=-2.0, high=2.0)) is not None:
        p.presence_penalty = presence
    if (frequency := f.number("frequency_penalty", low=-2.0, high=2.0)) is not None:
        p.frequency_penalty = frequency
    if (seed := f.integer("seed", low=-(2 ** 63), high=2 ** 64 - 1)) is not None:
        p.seed = seed % 2 ** 64
    p.stop.extend(_stop(f.get("stop")))
    for token, bias in _logit_bias(f.get("logit_bias")).items():
        p.logit_bias[token] = bias
    # vLLM's extensions.
    if (top_k := f.integer("top_k", low=-1)) is not None and top_k > 0:
        p.top_k = top_k
    if (min_p := f.number("min_p", low=0.0, high=1.0)) is not None:
        p.min_p = min_p
    if (repetition := f.number("repetition_penalty", low=0.0)) is not None:
        if repetition == 0.0:
            raise invalid("'repetition_penalty' must be > 0", param="repetition_penalty")
        p.repetition_penalty = repetition
    if (min_tokens := f.integer("min_tokens", low=0)) is not None:
        p.min_tokens = min_tokens
    p.ignore_eos = bool(f.boolean("ignore_eos"))
    if (speculative := f.boolean("speculative")) is not None:
        p.speculative = speculative
    stop_ids = f.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT32_MAX
                for t in stop_ids):
            raise invalid("'stop_token_ids' must be a list of token ids", param="stop_token_ids")
        p.stop_token_ids.extend(stop_ids)
    return p


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("'stop' must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOP:
        raise invalid(f"'stop' takes at most {MAX_STOP} strings, got {len(stops)}",
                      param="stop")
    return stops


def _logit_bias(value: Any) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid("'logit_bias' must map token ids to biases", param="logit_bias")
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise invalid(f"'logit_bias' keys must be token ids, got {key!r}",
                          param="logit_bias") from None
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not (
                -100 <= bias <= 100):
            raise invalid(f"'logit_bias' values must be numbers in [-100, 100], got {bias!r}",
                          param="logit_bias")
        out[token] = float(bias)
    return out


def _response_format(value: Any) -> common_pb2.Constraint | None:
    """OpenAI's ``response_format`` as the engine's constraint; None for free text."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise invalid("'response_format' must be an object with a 'type'",
                      param="response_format")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return common_pb2.Constraint(json_object=common_pb2.JsonObject())
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise invalid("'response_format.json_schema' must be an object with a 'name'",
                          param="response_format")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise invalid("'response_format.json_schema.schema' must be a JSON Schema "
                          "object", param="response_format")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise invalid("'response_format.json_schema.strict' must be true or false",
                          param="response_format")
        js = common_pb2.JsonSchema(schema=json.dumps(schema))
        # OpenAI's default is not strict; this server enforces the schema either way and
        # strict only decides what it does with keywords it cannot enforce.
        js.strict = bool(strict)
        return common_pb2.Constraint(json_schema=js)
    raise invalid(f"'response_format.type' must be text, json_object or json_schema, "
                  f"got {kind!r}", param="response_format")


def _n(f: _Fields) -> int:
    n = f.integer("n", low=1, high=MAX_N)
    return 1 if n is None else n


def _stream_options(f: _Fields, stream: bool) -> bool:
    options = f.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise invalid("'stream_options' is only allowed with stream: true",
                      param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise invalid("'stream_options' takes only 'include_usage'", param="stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise invalid("'stream_options.include_usage' must be true or false",
                      param="stream_options")
    return include


# ---- the two endpoints --------------------------------------------------------------

def chat_request(body: Mapping[str, Any]) -> Parsed:
    f = _Fields(body)
    model = f.string("model", required=True) or ""
    request = generation_pb2.GenerateRequest(model=model)
    request.tools.extend(_tools(f.get("tools")))
    if (choice := _tool_choice(f.get("tool_choice"))) is not None:
        request.tool_choice.CopyFrom(choice)
    request.chat.messages.extend(_messages(f.get("messages")))
    request.params.CopyFrom(_sampling(f, default_max_tokens=0))
    if (response_format := _response_format(f.get("response_format"))) is not None:
        request.params.constraint.CopyFrom(response_format)
    wants = f.boolean("logprobs")
    top = f.integer("top_logprobs", low=0, high=MAX_TOP_LOGPROBS)
    if top and not wants:
        raise invalid("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    request.params.return_logprobs = bool(wants)
    request.params.logprobs = top or 0
    _not_supported(f, "functions", bool, "the deprecated 'functions' (use 'tools')")
    _not_supported(f, "function_call", bool, "the deprecated 'function_call' (use "
                   "'tool_choice')")
    n = _n(f)
    stream = bool(f.boolean("stream"))
    include_usage = _stream_options(f, stream)
    f.refuse_unknown(_IGNORED)
    request.n = n
    return Parsed(model, request, stream, include_usage)


def completion_request(body: Mapping[str, Any]) -> Parsed:
    f = _Fields(body)
    model = f.string("model", required=True) or ""
    request = generation_pb2.GenerateRequest(model=model, prompt=_prompt(f.get("prompt")))
    request.params.CopyFrom(_sampling(f, default_max_tokens=DEFAULT_COMPLETION_MAX_TOKENS))
    # The legacy API's logprobs: the number of alternatives (0 still returns the
    # chosen tokens' logprobs).
    top = f.integer("logprobs", low=0, high=MAX_COMPLETION_LOGPROBS)
    request.params.return_logprobs = top is not None
    request.params.logprobs = top or 0
    _not_supported(f, "echo", bool, "echoing the prompt")
    _not_supported(f, "suffix", bool, "insertion with a suffix")
    _not_supported(f, "best_of", lambda v: v != 1, "best_of")
    n = _n(f)
    stream = bool(f.boolean("stream"))
    include_usage = _stream_options(f, stream)
    f.refuse_unknown(_IGNORED)
    request.n = n
    return Parsed(model, request, stream, include_usage)


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, list):
        raise invalid("'prompt' must be one string (a list of several prompts or of token "
                      "ids is not supported yet)", param="prompt")
    if not isinstance(value, str) or not value:
        raise invalid("'prompt' is required: a non-empty string", param="prompt")
    return value


def _tools(value: Any) -> list[common_pb2.Tool]:
    """OpenAI's ``tools``: each ``{"type": "function", "function": {"name", "description"?,
    "parameters"?}}``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("'tools' must be a list of tools", param="tools")
    out = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type") != "function":
            raise invalid(f"'{where}' must be {{\"type\": \"function\", \"function\": {{...}}}}",
                          param=where)
        name, description = fn.get("name"), fn.get("description") or ""
        parameters = fn.get("parameters")
        if not isinstance(name, str):
            raise invalid(f"'{where}.function.name' must be a string", param=where)
        if not isinstance(description, str):
            raise invalid(f"'{where}.function.description' must be a string", param=where)
        if parameters is not None and not isinstance(parameters, dict):
            raise invalid(f"'{where}.function.parameters' must be a JSON Schema object",
                          param=where)
        out.append(common_pb2.Tool(name=name, description=description,
                                   parameters="" if parameters is None
                                   else json.dumps(parameters)))
    return out


def _tool_choice(value: Any) -> generation_pb2.ToolChoice | None:
    """OpenAI's ``tool_choice``: a mode, or ``{"type": "function", "function": {"name"}}``."""
    if value is None:
        return None
    if isinstance(value, str) and value in _TOOL_MODES:
        return generation_pb2.ToolChoice(mode=_TOOL_MODES[value])
    fn = value.get("function") if isinstance(value, dict) else None
    if (isinstance(value, dict) and value.get("type") == "function" and isinstance(fn, dict)
            and isinstance(fn.get("name"), str)):
        return generation_pb2.ToolChoice(function=fn["name"])
    raise invalid("'tool_choice' must be none, auto, required or "
                  "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")


def _messages(value: Any) -> list[generation_pb2.Message]:
    """The messages as the frontend's: the developer role is the system's."""
    if not isinstance(value, list) or not value:
        raise invalid("'messages' is required: a non-empty list of messages",
                      param="messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"'{where}' must be an object", param=where)
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}",
                          param=where)
        calls = m.get("tool_calls")
        if calls is not None and role != "assistant":
            raise invalid(f"'{where}.tool_calls' is only for assistant messages", param=where)
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise invalid(f"'{where}.tool_call_id' is required for a tool message",
                          param=where)
        content = m.get("content")
        text = "" if content is None and (calls or role == "assistant") else _content(
            content, where)
        out.append(generation_pb2.Message(
            role="system" if role == "developer" else role, content=text,
            tool_call_id=m["tool_call_id"] if role == "tool" else "",
            tool_calls=_tool_calls(calls, where) if calls else ()))
    return out


def _tool_calls(calls: Any, where: str) -> list[common_pb2.ToolCall]:
    """An assistant message's calls: each {"id", "type": "function", "function":
    {"name", "arguments": JSON text of an object}}."""
    if not isinstance(calls, list):
        raise invalid(f"'{where}.tool_calls' must be a list", param=where)
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(
                fn.get("arguments", "{}"), str) or not isinstance(call.get("id", ""), str):
            raise invalid(f"'{where}.tool_calls' entries must be {{\"id\": ..., \"type\": "
                          "\"function\", \"function\": {\"name\": ..., \"arguments\": "
                          "\"<JSON>\"}}", param=where)
        out.append(common_pb2.ToolCall(id=call.get("id", ""), name=fn["name"],
                                       arguments=fn.get("arguments", "{}")))
    return out


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                raise invalid(f"'{where}.content' parts must be text parts "
                              "({\"type\": \"text\", \"text\": ...}); this model reads text only",
                              param=where)
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"'{where}.content' must be a string or a list of text parts", param=where)
