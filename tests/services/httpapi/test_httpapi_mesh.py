"""The OpenAI-compatible HTTP API end to end, spoken to with OpenAI's own Python SDK:
real Envoy (keys, tenants, rate limits), the httpapi process, the frontend's pipeline
and the worker (the session's ``mesh`` fixture)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import jsonschema
import openai
import pytest

from genmesh.client.types import DEV_API_KEY
from tests.conftest import OTHER_API_KEY
from tests.services.frontend.test_frontend_mesh import wait_idle, worker_stats

QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


def base_url(mesh) -> str:
    return f"http://{mesh.edge_address}/v1"


@pytest.fixture(scope="module")
def client(mesh):
    with openai.OpenAI(base_url=base_url(mesh), api_key=DEV_API_KEY, timeout=120,
                       max_retries=0) as c:
        yield c


def test_chat_whole_and_streamed_are_the_same_for_the_same_seed(mesh, client):
    whole = client.chat.completions.create(model=mesh.model, messages=QUESTION, seed=7,
                                           temperature=0.8, max_completion_tokens=20)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    (choice,) = whole.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    streamed = client.chat.completions.create(
        model=mesh.model, messages=QUESTION, seed=7, temperature=0.8,
        max_completion_tokens=20, stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        whole.usage.prompt_tokens, whole.usage.completion_tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason


def test_usage_counts_the_tokens_streamed(mesh, client):
    chunks = list(client.chat.completions.create(
        model=mesh.model, messages=QUESTION, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-2].choices[0].finish_reason == "length"
    # A second identical prompt reuses the first's KV blocks.
    again = client.chat.completions.create(model=mesh.model, messages=QUESTION,
                                           max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_three_choices(mesh, client):
    reply = client.chat.completions.create(model=mesh.model, messages=QUESTION, n=3,
                                           seed=1, temperature=1.0, max_tokens=12)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.message.content for c in reply.choices)
    assert len({c.message.content for c in reply.choices}) > 1  # sampled, distinct seeds
    assert reply.usage.completion_tokens <= 36


def test_completions_and_stop_strings(mesh, client):
    whole = client.completions.create(model=mesh.model, prompt="1, 2, 3, 4,",
                                      max_tokens=16, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text
    stopped = client.completions.create(model=mesh.model, prompt="1, 2, 3, 4,",
                                        max_tokens=16, temperature=0, stop=["7"])
    assert "7" not in stopped.choices[0].text
    assert whole.choices[0].text.startswith(stopped.choices[0].text)
    assert stopped.choices[0].finish_reason == "stop"


def test_json_schema_output_validates(mesh, client):
    schema = {"type": "object", "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "count": {"type": "integer"}}, "required": ["colour", "count"],
        "additionalProperties": False}
    reply = client.chat.completions.create(
        model=mesh.model, messages=QUESTION, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {
            "name": "answer", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_async_sdk_and_models(mesh):
    async def main() -> tuple[list[str], str]:
        async with openai.AsyncOpenAI(base_url=base_url(mesh), api_key=DEV_API_KEY,
                                      timeout=60, max_retries=0) as c:
            models = [m.id async for m in c.models.list()]
            stream = await c.chat.completions.create(model=mesh.model, messages=QUESTION,
                                                     max_tokens=8, stream=True)
            text = "".join([ch.choices[0].delta.content or "" async for ch in stream])
            return models, text
    models, text = asyncio.run(main())
    assert models == [mesh.model] and text


def test_errors_are_openai_errors_with_the_right_status(mesh, client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=mesh.model, messages=QUESTION, temperature=5)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url(mesh), api_key="wrong", max_retries=0
                      ).models.list()
    # Prompt + max_tokens beyond the tenant's whole token budget: 429, naming the budget.
    with pytest.raises(openai.RateLimitError) as budget:
        client.chat.completions.create(model=mesh.model, messages=QUESTION,
                                       max_tokens=10_000_000)
    assert "tokens_per_minute" in budget.value.message and budget.value.status_code == 429


def test_the_edge_rate_limit_is_429_with_retry_after(mesh):
    url = f"{base_url(mesh)}/models"

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as c:
            return await asyncio.gather(*(c.get(url, headers={
                "authorization": f"Bearer {OTHER_API_KEY}"}) for _ in range(80)))
    replies = asyncio.run(burst())
    limited = [r for r in replies if r.status_code == 429]
    assert limited and all(r.status_code in (200, 429) for r in replies)
    assert limited[0].headers["retry-after"] and limited[0].json()["error"]["code"]
    time.sleep(1.1)  # the bucket refills before other tests speak as this tenant


def test_a_cancelled_stream_frees_its_kv_blocks(mesh, client):
    idle_free = wait_idle(mesh).num_kv_blocks_free
    stream = client.chat.completions.create(
        model=mesh.model, messages=[{"role": "user", "content": "Count to a thousand."}],
        max_tokens=1000, stream=True, extra_body={"ignore_eos": True})
    seen = 0
    for chunk in stream:
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen == 3:
            break
    assert worker_stats(mesh).num_running == 1
    stream.close()  # the HTTP connection goes away
    t0 = time.monotonic()
    while (stats := worker_stats(mesh)).num_kv_blocks_free != idle_free or stats.num_running:
        assert time.monotonic() - t0 < 1.0, f"blocks not freed: {stats}"
        time.sleep(0.01)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
CONVERT = {"type": "function", "function": {
    "name": "convert", "description": "Convert an amount of money.",
    "parameters": {"type": "object", "properties": {
        "amount": {"type": "number"}, "to": {"type": "string", "enum": ["EUR", "USD"]}},
        "required": ["amount", "to"], "additionalProperties": False}}}


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_always_gives_a_valid_call(mesh, client, stream):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CONVERT)}
    asks = ["What's the weather in Paris?", "Convert 20 dollars to euros.",
            "Is it raining in Oslo?", "How much is 5 EUR in USD?"]
    for ask in asks[:2] if stream else asks:
        reply = client.chat.completions.create(
            model=mesh.model, messages=[{"role": "user", "content": ask}],
            tools=[WEATHER, CONVERT], tool_choice="required", max_tokens=60, temperature=0.7,
            seed=3, stream=stream)
        if stream:
            calls = [tc for ch in reply for tc in (ch.choices[0].delta.tool_calls or [])
                     if ch.choices]
            name, args = calls[0].function.name, calls[0].function.arguments
        else:
            (choice,) = reply.choices
            assert choice.finish_reason == "tool_calls"
            (call,) = choice.message.tool_calls
            name, args = call.function.name, call.function.arguments
        jsonschema.validate(json.loads(args), schemas[name])


def test_a_named_tool_choice_calls_that_function_and_results_go_back(mesh, client):
    reply = client.chat.completions.create(
        model=mesh.model, messages=[{"role": "user", "content": "Weather in Rome?"}],
        tools=[WEATHER, CONVERT], max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    follow = client.chat.completions.create(
        model=mesh.model, tools=[WEATHER, CONVERT], max_tokens=20, temperature=0,
        messages=[{"role": "user", "content": "Weather in Rome?"},
                  reply.choices[0].message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_auto_tool_choice_answers_with_content_or_valid_calls(mesh, client):
    """SmolLM2-135M was not trained to call tools: under auto it mostly answers in
    text. Either way the answer is well formed: calls parse and name declared functions."""
    made = 0
    for ask in ["What's the weather in Paris? Use the tool."]:
        reply = client.chat.completions.create(
            model=mesh.model, messages=[{"role": "user", "content": ask}],
            tools=[WEATHER, CONVERT], max_tokens=40, temperature=0)
        message = reply.choices[0].message
        for call in message.tool_calls or []:
            assert call.function.name in ("get_weather", "convert")
            json.loads(call.function.arguments)
            made += 1
        assert message.content or message.tool_calls
        print(ask, "->", message.content, message.tool_calls)
    print("calls made under auto:", made)


def test_logprobs_whole_and_streamed(mesh, client):
    whole = client.chat.completions.create(model=mesh.model, messages=QUESTION, max_tokens=8,
                                           temperature=0, logprobs=True, top_logprobs=2)
    content = whole.choices[0].logprobs.content
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-4)  # greedy
    streamed = [c for c in client.chat.completions.create(
        model=mesh.model, messages=QUESTION, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=2, stream=True) if c.choices and c.choices[0].logprobs]
    tokens = [t for c in streamed for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 3)) for t in tokens] == [
        (t.token, round(t.logprob, 3)) for t in content]
    text = client.completions.create(model=mesh.model, prompt="1, 2, 3,", max_tokens=4,
                                     temperature=0, logprobs=1)
    lp = text.choices[0].logprobs
    assert "".join(lp.tokens) == text.choices[0].text and len(lp.top_logprobs) == len(lp.tokens)
