"""The public API end to end: real Envoy, frontend, tokenizer and worker processes
(the session's ``mesh`` fixture), called through Envoy's edge listener."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from tokenizers import Tokenizer

from genmesh.client import (
    AsyncClient,
    ChatError,
    Client,
    GenmeshError,
    TextDelta,
    TurnFinished,
    TurnStarted,
)
from genmesh.client.types import DEV_API_KEY
from genmesh.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)


@pytest.fixture(scope="module")
def client(mesh):
    with Client(mesh.edge_address, timeout_s=120) as c:
        yield c


def engine_greedy(mesh, model_dir, messages: list[dict[str, str]], max_tokens: int) -> str:
    """The worker's own greedy answer for a conversation, detokenized locally."""
    with mesh.service_channel("tokenizer") as ch:
        ids = tokenizer_pb2_grpc.TokenizerStub(ch).ApplyChatTemplate(
            tokenizer_pb2.ChatTemplateRequest(
                model=mesh.model, add_generation_prompt=True,
                messages=[tokenizer_pb2.ChatMessage(**m) for m in messages]),
            timeout=30).token_ids
    with mesh.service_channel("worker") as ch:
        out = [t for r in worker_pb2_grpc.WorkerStub(ch).Generate(
            worker_pb2.WorkerGenerateRequest(
                prompt_ids=ids, params=common_pb2.SamplingParams(max_tokens=max_tokens)),
            timeout=60) for t in r.token_ids]
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).decode(
        out, skip_special_tokens=True)


def worker_stats(mesh) -> worker_pb2.WorkerStats:
    with mesh.service_channel("worker") as ch:
        return worker_pb2_grpc.WorkerStub(ch).GetStats(worker_pb2.GetStatsRequest(), timeout=5)


def wait_idle(mesh, timeout_s: float = 10.0) -> worker_pb2.WorkerStats:
    deadline = time.monotonic() + timeout_s
    while (stats := worker_stats(mesh)).num_running or stats.num_waiting:
        assert time.monotonic() < deadline, "the worker did not go idle"
        time.sleep(0.02)
    return stats


def test_two_turn_chat_streams_deltas_reuses_the_prefix_and_equals_the_engine(
        mesh, client, model_dir):
    turns = ["What is the capital of France?", "And what is it famous for?"]
    history: list[dict[str, str]] = []
    with client.chat(max_tokens=24) as session:
        for n, content in enumerate(turns, start=1):
            events = list(session.turn(content))
            assert isinstance(events[0], TurnStarted) and events[0].turn == n
            deltas = [e.text for e in events if isinstance(e, TextDelta)]
            finished = events[-1]
            assert isinstance(finished, TurnFinished) and finished.finish_reason in (
                "stop", "length")
            assert len(deltas) > 3, "text streams as several deltas"
            history.append({"role": "user", "content": content})
            assert "".join(deltas) == engine_greedy(mesh, model_dir, history, 24)
            history.append({"role": "assistant", "content": "".join(deltas)})
            if n == 2:
                assert finished.usage.cached_prompt_tokens > 0
                assert finished.usage.cached_prompt_tokens <= finished.usage.prompt_tokens


def test_cancel_frees_the_kv_blocks_within_a_second_and_the_session_goes_on(mesh, client):
    idle_free = wait_idle(mesh).num_kv_blocks_free
    with client.chat(max_tokens=400, ignore_eos=True) as session:
        session.start_turn("Count from one to a thousand, in words.")
        num_deltas = 0
        while num_deltas < 3:
            event = session.next_event(timeout_s=60)
            num_deltas += isinstance(event, TextDelta)
        assert worker_stats(mesh).num_running == 1
        session.cancel()
        t0 = time.monotonic()
        while not isinstance(event, TurnFinished):
            event = session.next_event(timeout_s=10)
        assert event.finish_reason == "abort"
        while (stats := worker_stats(mesh)).num_kv_blocks_free != idle_free or stats.num_running:
            assert time.monotonic() - t0 < 1.0, f"blocks not freed: {stats}"
            time.sleep(0.01)
        events = list(session.turn("Just say hi.", max_tokens=8))
        assert isinstance(events[-1], TurnFinished) and events[-1].turn == 2
        assert events[-1].finish_reason in ("stop", "length")


def test_32_concurrent_streams_through_envoy_all_complete_correctly(mesh, client):
    prompts = [f"Write a short line about the number {i}." for i in range(4)]
    expected = {p: client.generate(messages=[{"role": "user", "content": p}],
                                   max_tokens=16).text for p in prompts}

    def one(i: int) -> tuple[str, str, str | None, int]:
        prompt = prompts[i % len(prompts)]
        chunks = list(client.generate_stream(messages=[{"role": "user", "content": prompt}],
                                             max_tokens=16))
        text = "".join(c.text for c in chunks)
        return prompt, text, chunks[-1].finish_reason, len(chunks)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert len(results) == 32
    for prompt, text, reason, num_chunks in results:
        assert reason in ("stop", "length")
        assert text == expected[prompt]
        assert num_chunks > 3
    assert wait_idle(mesh).num_running == 0


def test_generate_stream_first_message_then_text_then_finish(client):
    chunks = list(client.generate_stream("The quick brown fox", max_tokens=8, ignore_eos=True))
    assert chunks[0].request_id and chunks[0].model_version == "v1"
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 8
    assert "".join(c.text for c in chunks).strip()


def test_unary_generate_and_stop_strings(client):
    full = client.generate("1, 2, 3, 4,", max_tokens=16, ignore_eos=True)
    assert full.finish_reason == "length" and full.model_version == "v1"
    stop = full.text.strip()[:3]
    cut = client.generate("1, 2, 3, 4,", max_tokens=16, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]


def test_list_models(mesh, client):
    [model] = client.list_models()
    assert (model.name, model.versions, model.is_default) == (mesh.model, ("v1",), True)
    assert model.has_chat_template and model.max_model_len > 0


def test_async_client_every_call_shape(mesh):
    async def main() -> None:
        async with AsyncClient(mesh.edge_address, timeout_s=60) as c:
            unary = await c.generate("Hello", max_tokens=4, ignore_eos=True)
            streamed = [ch async for ch in c.generate_stream("Hello", max_tokens=4,
                                                             ignore_eos=True)]
            assert "".join(ch.text for ch in streamed) == unary.text
            async with c.chat(max_tokens=6) as session:
                events = [e async for e in session.turn("Hi there")]
                assert isinstance(events[-1], TurnFinished)
            assert (await c.list_models())[0].name == mesh.model

    asyncio.run(main())


# ---- bad input: a clear status, and the server survives --------------------------


@pytest.mark.parametrize(("kwargs", "code", "words"), [
    (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(messages=[]), grpc.StatusCode.INVALID_ARGUMENT, "messages"),
    (dict(prompt="hi", model="gpt-17"), grpc.StatusCode.NOT_FOUND, "gpt-17"),
    (dict(prompt="hi", model_version="v9"), grpc.StatusCode.NOT_FOUND, "v9"),
    (dict(prompt="hi", temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(prompt="hi", top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(prompt="hi", max_tokens=-3), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (dict(prompt="hi", stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    (dict(messages=[{"role": "wizard", "content": "x"}]), grpc.StatusCode.INVALID_ARGUMENT,
     "role"),
])
def test_bad_requests_get_a_clear_status(client, kwargs, code, words):
    with pytest.raises(GenmeshError) as err:
        client.generate(**kwargs)
    assert err.value.code == code
    assert words in err.value.message
    with pytest.raises(GenmeshError) as err:
        list(client.generate_stream(**kwargs))
    assert err.value.code == code


def test_oversized_prompt_is_invalid_argument(client):
    limit = client.list_models()[0].max_model_len
    with pytest.raises(GenmeshError) as err:
        client.generate("word " * (limit + 10), max_tokens=4)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(limit) in err.value.message
    assert client.generate("still serving", max_tokens=2).usage.completion_tokens == 2


def test_chat_turn_before_start_is_failed_precondition(mesh):
    with grpc.insecure_channel(mesh.edge_address) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        turn = generation_pb2.ChatRequest(turn=generation_pb2.UserTurn(content="hi"))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Chat(iter([turn]), timeout=10,
                           metadata=[("x-api-key", DEV_API_KEY)]))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "StartSession" in err.value.details()


def test_unknown_model_in_start_session_ends_the_stream_with_not_found(client):
    with pytest.raises(GenmeshError) as err, client.chat(model="nope") as session:
        list(session.turn("hi"))
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_session_errors_are_events_and_the_session_survives(client):
    with client.chat(max_tokens=24, ignore_eos=True) as session:
        with pytest.raises(GenmeshError) as err:
            list(session.turn("   "))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        session.cancel()  # nothing running
        event = session.next_event(timeout_s=10)
        assert isinstance(event, ChatError)
        assert event.code == grpc.StatusCode.FAILED_PRECONDITION
        session.start_turn("Tell me a story.")
        session.start_turn("A second turn while the first runs")
        seen = []
        while not isinstance(seen[-1] if seen else None, TurnFinished):
            seen.append(session.next_event(timeout_s=60))
        errors = [e for e in seen if isinstance(e, ChatError)]
        assert [e.code for e in errors] == [grpc.StatusCode.FAILED_PRECONDITION]
        assert seen[-1].finish_reason == "length"
        assert list(session.turn("ok", max_tokens=2))[-1].finish_reason == "length"


def test_client_deadline_is_honoured_and_the_generation_aborted(mesh):
    idle_free = wait_idle(mesh).num_kv_blocks_free
    with Client(mesh.edge_address, timeout_s=1.0) as short:
        t0 = time.monotonic()
        with pytest.raises(GenmeshError) as err:
            list(short.generate_stream("Count to a million:", max_tokens=2000, ignore_eos=True))
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 3.0
    assert wait_idle(mesh, timeout_s=3).num_kv_blocks_free == idle_free


def test_closing_a_stream_early_aborts_the_worker_request(mesh, client):
    idle_free = wait_idle(mesh).num_kv_blocks_free
    stream = client.generate_stream("Once upon a time", max_tokens=1000, ignore_eos=True)
    for _, _ in zip(range(3), stream, strict=False):
        pass
    stream.close()
    t0 = time.monotonic()
    while worker_stats(mesh).num_kv_blocks_free != idle_free:
        assert time.monotonic() - t0 < 2.0
        time.sleep(0.01)


# ---- logprobs and n choices ---------------------------------------------------------


def engine_tokens(mesh, messages: list[dict[str, str]], params: common_pb2.SamplingParams
                  ) -> list[common_pb2.TokenLogprob]:
    """The worker's own tokens (with their logprobs) for a conversation, asked directly."""
    with mesh.service_channel("tokenizer") as ch:
        ids = tokenizer_pb2_grpc.TokenizerStub(ch).ApplyChatTemplate(
            tokenizer_pb2.ChatTemplateRequest(
                model=mesh.model, add_generation_prompt=True,
                messages=[tokenizer_pb2.ChatMessage(**m) for m in messages]),
            timeout=30).token_ids
    with mesh.service_channel("worker") as ch:
        return [lp for r in worker_pb2_grpc.WorkerStub(ch).Generate(
            worker_pb2.WorkerGenerateRequest(prompt_ids=ids, params=params), timeout=60)
            for lp in r.logprobs]


def test_logprobs_are_the_worker_s_own_with_each_token_s_strings(mesh, client, model_dir):
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    expected = engine_tokens(mesh, messages, common_pb2.SamplingParams(max_tokens=16,
                                                                       logprobs=3))
    strings = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    unary = client.generate(messages=messages, max_tokens=16, logprobs=3)
    # The end token, when it ended the answer, is no text and so not reported.
    assert [t.token_id for t in unary.logprobs] == [
        lp.token_id for lp in expected][:len(unary.logprobs)]
    assert len(unary.logprobs) >= len(expected) - 1
    for got, want in zip(unary.logprobs, expected, strict=False):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-3)
        assert [t.token_id for t in got.top_logprobs] == [t.token_id for t in want.top]
        assert got.token == strings.decode([got.token_id])
    assert b"".join(t.token_bytes for t in unary.logprobs) == unary.text.encode()
    # Streamed: each message carries the tokens whose text it ends (moderation may have
    # released the start of a token's text before its end); without alternatives.
    chunks = list(client.generate_stream(messages=messages, max_tokens=16,
                                         return_logprobs=True))
    assert "".join(c.text for c in chunks) == unary.text
    text, token_bytes = b"", b""
    for chunk in chunks:
        text += chunk.text.encode()
        token_bytes += b"".join(t.token_bytes for t in chunk.logprobs)
        assert text.startswith(token_bytes)
        assert all(not t.top_logprobs for t in chunk.logprobs)
    assert token_bytes == text
    assert [t.token_id for c in chunks for t in c.logprobs] == [
        t.token_id for t in unary.logprobs]


def test_a_stop_string_cuts_the_tokens_of_its_text(client):
    full = client.generate("1, 2, 3, 4,", max_tokens=16, ignore_eos=True, return_logprobs=True)
    stop = full.text.strip()[:3]
    cut = client.generate("1, 2, 3, 4,", max_tokens=16, ignore_eos=True, stop=[stop],
                          return_logprobs=True)
    assert cut.finish_reason == "stop"
    reported = b"".join(t.token_bytes for t in cut.logprobs)
    assert cut.text.encode().startswith(reported)  # a token running into the stop: cut
    assert [t.token_id for t in cut.logprobs] == [
        t.token_id for t in full.logprobs][:len(cut.logprobs)]


def test_n_choices_each_with_its_seed_sharing_the_prompt_s_kv_blocks(mesh, client):
    messages = [{"role": "user", "content": "Write one sentence about a lighthouse by the "
                                            "sea, its keeper and the evening light."}]
    params = dict(max_tokens=12, temperature=0.9, seed=11)
    reply = client.generate(messages=messages, n=3, logprobs=1, **params)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert (reply.text, reply.logprobs) == (reply.choices[0].text, reply.choices[0].logprobs)
    assert reply.usage.completion_tokens == sum(c.usage.completion_tokens
                                                for c in reply.choices)
    assert not reply.usage.response_cached
    # The first choice computed the prompt; the others found its full blocks cached.
    assert all(c.usage.cached_prompt_tokens >= 16 for c in reply.choices[1:])
    for choice in reply.choices:
        assert choice.finish_reason in ("stop", "length") and choice.logprobs
    # Each choice is the answer of its own seed (the request's + its index) ...
    for choice in reply.choices:
        alone = client.generate(messages=messages, skip_cache=True,
                                **{**params, "seed": 11 + choice.index})
        assert alone.text == choice.text
    # ... and streamed, the choices interleave, each finished with its own usage.
    chunks = list(client.generate_stream(messages=messages, n=3, **params))
    for choice in reply.choices:
        mine = [c for c in chunks if c.index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert mine[-1].finish_reason == choice.finish_reason
        assert mine[-1].usage is not None
        assert mine[-1].usage.completion_tokens == choice.usage.completion_tokens
    assert wait_idle(mesh).num_running == 0


def test_n_is_bounded(client):
    with pytest.raises(GenmeshError) as err:
        client.generate("hi", n=17)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "n:" in err.value.message
