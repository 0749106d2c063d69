"""Issue 20's attacker rows, turned around, against the whole mesh of `genmesh up` (the
session's ``mesh``): each malformed or oversized request fails alone with a clear code
while bystanders stream through the same Envoy to the same frontend, and every
bystander's stream completes; two keys are UNAUTHENTICATED; Envoy's admin dump holds no
key. Every attack runs at once beside two bystanders, and (slow) beside six; a Chat
that floods refused messages and never reads is among them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable

import grpc
import pytest

from genmesh.client.types import DEV_API_KEY
from genmesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from services.frontend import chat
from tests.conftest import OTHER_API_KEY, RunningMesh

KEY = (("x-api-key", DEV_API_KEY),)
GENERATE = "/genmesh.v1.Generation/Generate"
Attack = Callable[[grpc.aio.Channel], Awaitable[object]]


def raw(channel: grpc.aio.Channel, payload: bytes) -> Awaitable[object]:
    """Generate with ``payload`` as the request's bytes, whatever they are."""
    call = channel.unary_unary(GENERATE, request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
    return call(payload, metadata=KEY, timeout=30)


def generate(channel: grpc.aio.Channel, **fields: object) -> Awaitable[object]:
    stub = generation_pb2_grpc.GenerationStub(channel)
    request = generation_pb2.GenerateRequest(**fields)  # type: ignore[arg-type]
    return stub.Generate(request, metadata=KEY, timeout=30)


ATTACKS: dict[str, tuple[Attack, grpc.StatusCode, str]] = {
    "100 KB model": (lambda ch: generate(ch, model="m" * 100_000, prompt="hi"),
                     grpc.StatusCode.INVALID_ARGUMENT, "model: at most 128"),
    "1 MB role": (lambda ch: generate(ch, chat=generation_pb2.ChatTurnList(messages=[
        generation_pb2.Message(role="r" * 1_000_000, content="hi")])),
                  grpc.StatusCode.INVALID_ARGUMENT, "chat.messages[0].role: 1 to 32"),
    "64 KB request id": (lambda ch: generate(ch, prompt="hi", request_id="x" * 65536),
                         grpc.StatusCode.INVALID_ARGUMENT, "request_id: at most 128"),
    "request id with a newline": (lambda ch: generate(ch, prompt="hi", request_id="a\nb"),
                                  grpc.StatusCode.INVALID_ARGUMENT, "request_id: at most 128"),
    "invalid UTF-8": (lambda ch: raw(ch, b"\x1a\x03a\xffb"),  # prompt = 61 ff 62
                      grpc.StatusCode.INVALID_ARGUMENT, "String field had bad UTF-8"),
    "truncated message": (lambda ch: raw(ch, generation_pb2.GenerateRequest(
        prompt="hello there").SerializeToString()[:-3]),
                          grpc.StatusCode.INVALID_ARGUMENT, "Wire format was corrupt"),
    "job id with a space": (lambda ch: generation_pb2_grpc.GenerationStub(ch).GetJob(
        generation_pb2.JobRef(job_id="a b"), metadata=KEY, timeout=30),
                            grpc.StatusCode.INVALID_ARGUMENT, "no whitespace"),
    "job id of 10,000 characters": (lambda ch: generation_pb2_grpc.GenerationStub(ch).GetJob(
        generation_pb2.JobRef(job_id="j" * 10_000), metadata=KEY, timeout=30),
                                    grpc.StatusCode.INVALID_ARGUMENT, "1 to 128 characters"),
}


async def bystander(address: str, n: int) -> tuple[int, common_pb2.FinishReason]:
    """A stream of its own connection: (messages, finish reason) once it completes."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateRequest(
            prompt=f"Count from 1 to 20, bystander {n}.", skip_cache=True,
            params=common_pb2.SamplingParams(max_tokens=8, ignore_eos=True))
        replies = [r async for r in stub.GenerateStream(request, metadata=KEY, timeout=120)]
        return len(replies), replies[-1].finish_reason


async def attack(address: str, run: Attack) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await run(channel)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def chat_flood(address: str) -> tuple[grpc.StatusCode, str, int]:
    """A Chat that sends empty messages back to back and reads nothing: as many as end the
    session (writing on after its end would race the status with grpc's own failure)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = generation_pb2_grpc.GenerationStub(channel).Chat(metadata=KEY, timeout=60)
        await call.write(generation_pb2.ChatRequest(start=generation_pb2.StartSession()))
        for _ in range(chat.MAX_REFUSED_IN_A_ROW):
            await call.write(generation_pb2.ChatRequest())
        with contextlib.suppress(grpc.aio.AioRpcError):  # read at last: grpc gives the
            async for _ in call:  # status only to a caller that read the messages before it
                pass
        return await call.code(), await call.details(), chat.MAX_REFUSED_IN_A_ROW


async def attacked(mesh: RunningMesh, *, num_bystanders: int, is_flooded: bool
                   ) -> tuple[list[tuple[int, int]], dict[str, tuple[grpc.StatusCode, str]],
                              tuple[grpc.StatusCode, str, int] | None]:
    bystanders = [asyncio.ensure_future(bystander(mesh.edge_address, n))
                  for n in range(num_bystanders)]
    await asyncio.sleep(0.5)  # streaming before the attacks start
    flood = asyncio.ensure_future(chat_flood(mesh.edge_address)) if is_flooded else None
    results = await asyncio.gather(*(attack(mesh.edge_address, run)
                                     for run, _, _ in ATTACKS.values()))
    return (await asyncio.gather(*bystanders), dict(zip(ATTACKS, results, strict=True)),
            await flood if flood is not None else None)


def assert_alone(outcome: tuple[list[tuple[int, int]], dict[str, tuple[grpc.StatusCode, str]],
                                tuple[grpc.StatusCode, str, int] | None]) -> None:
    streams, attacks, flood = outcome
    for name, (code, details) in attacks.items():
        expected_code, expected_text = ATTACKS[name][1:]
        assert (code, expected_text in details) == (expected_code, True), (name, details)
        assert len(details) < 400, name  # no attacker's string comes back
    assert all(reason == common_pb2.FINISH_REASON_LENGTH for _, reason in streams), streams
    if flood is not None:
        code, details, _ = flood
        # The session ends at the 64th refused message in a row: a clear code of its own.
        assert (code, details.startswith("64 messages in a row were refused")) == (
            grpc.StatusCode.INVALID_ARGUMENT, True), flood


def test_each_malformed_request_fails_alone_while_others_stream(mesh):
    assert_alone(asyncio.run(attacked(mesh, num_bystanders=2, is_flooded=True)))


@pytest.mark.slow
def test_six_bystanders_complete_beside_every_attack_and_a_chat_flood(mesh):
    assert_alone(asyncio.run(attacked(mesh, num_bystanders=6, is_flooded=True)))


@pytest.mark.parametrize("keys", [(DEV_API_KEY, "wrong"), ("wrong", DEV_API_KEY),
                                  (DEV_API_KEY, OTHER_API_KEY)])
def test_two_keys_are_unauthenticated_whatever_their_order(mesh, keys):
    async def list_models() -> tuple[grpc.StatusCode, str]:
        async with grpc.aio.insecure_channel(mesh.edge_address) as channel:
            try:
                await generation_pb2_grpc.GenerationStub(channel).ListModels(
                    generation_pb2.ListModelsRequest(),
                    metadata=[("x-api-key", k) for k in keys], timeout=30)
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""

    assert asyncio.run(list_models()) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "this request carries 2 API keys; send exactly one, in 'x-api-key'")


def test_a_tenant_header_without_a_key_is_not_believed(mesh):
    async def as_forged_dev() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(mesh.edge_address) as channel:
            try:
                await generation_pb2_grpc.GenerationStub(channel).ListModels(
                    generation_pb2.ListModelsRequest(),
                    metadata=[("x-genmesh-tenant", "dev")], timeout=30)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    assert asyncio.run(as_forged_dev()) == grpc.StatusCode.UNAUTHENTICATED


def test_a_key_and_a_bearer_token_on_the_http_door_are_401(mesh):
    request = urllib.request.Request(
        f"http://{mesh.edge_address}/v1/models",
        headers={"x-api-key": DEV_API_KEY, "Authorization": f"Bearer {DEV_API_KEY}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401
    assert json.loads(refused.value.read())["error"] == {
        "message": "this request carries 2 API keys; send exactly one, in 'x-api-key' or "
                   "'Authorization: Bearer'",
        "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}


def test_envoys_admin_is_on_loopback_and_its_dump_holds_no_key(mesh):
    admin = f"http://127.0.0.1:{mesh.config.admin_port}"
    with urllib.request.urlopen(f"{admin}/config_dump?include_eds", timeout=30) as reply:
        dump = reply.read().decode()
    assert "x-genmesh-tenant" in dump  # the routes are there ...
    assert DEV_API_KEY not in dump and OTHER_API_KEY not in dump  # ... but no key
    bootstrap = json.loads(dump)["configs"][0]["bootstrap"]
    assert bootstrap["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
