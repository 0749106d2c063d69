"""A property-based fuzzer over every public request field, through Envoy's edge.

Property: every answer of Generate, GenerateStream and the HTTP API's
/v1/chat/completions is a success or a refusal the caller can act on (gRPC:
INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, PERMISSION_DENIED,
each with a message; HTTP: 2xx, 4xx or 503 with an OpenAI-shaped error body) — never
UNKNOWN, INTERNAL or a 500 — and afterwards the mesh is healthy: every process serving
and never restarted, the worker idle with all of its KV blocks free.

The default run is short; ``-m slow`` runs the long one (>= 5,000 requests), and
GENMESH_FUZZ_EXAMPLES sets the number of examples of either.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genmesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.conftest import OTHER_API_KEY
from tests.fuzz.strategies import chat_completion_bodies, generate_requests
from tests.services.frontend.test_frontend_mesh import wait_idle

# Tenant `other` of the test mesh: no token budget, 50 requests/s at the edge.
METADATA = (("x-api-key", OTHER_API_KEY),)
# No accepted request takes long (<= 8 tokens per choice); a call that runs into this
# deadline hangs somewhere, and DEADLINE_EXCEEDED is not an allowed answer.
CALL_TIMEOUT_S = 60.0
MAX_CONCURRENT_REQUESTS = 4
CALLER_CODES = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED})
NUM_EXAMPLES = int(os.environ.get("GENMESH_FUZZ_EXAMPLES", "0"))
CI_EXAMPLES, SLOW_EXAMPLES = 50, 1_400  # slow: >= 5,000 gRPC calls
CI_GRPC_EXAMPLES = 25  # ~4 calls each
SLOW_TIMEOUT_S = 3600


def fuzz_settings(default_examples: int) -> settings:
    # No example database: nothing is written into the repository.
    return settings(max_examples=NUM_EXAMPLES or default_examples, deadline=None,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


class Pacer:
    """Spaces requests out under the tenant's 50 requests/s at the edge, so that most of
    them reach the services instead of the rate limit."""

    def __init__(self, requests_per_second: float = 40.0) -> None:
        self.interval_s = 1.0 / requests_per_second
        self.next_at = time.monotonic()
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            at, self.next_at = max(now, self.next_at), max(now, self.next_at) + self.interval_s
        time.sleep(max(0.0, at - now))


PACER = Pacer()


class Tally:
    """What the fuzzer sent and what came back, printed at the end of a run."""

    def __init__(self) -> None:
        self.codes: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()  # the start of each refusal's message
        self.started = time.monotonic()

    def report(self, title: str) -> str:
        total = sum(self.codes.values())
        top = "\n  ".join(f"{v:5d} {k}" for k, v in self.refusals.most_common(12))
        return (f"{title}: {total} requests in {time.monotonic() - self.started:.1f} s: "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.codes.items()))
                + f"\n  most common refusals:\n  {top}")


# --- gRPC -------------------------------------------------------------------------------

def call_unary(stub: generation_pb2_grpc.GenerationStub,
               request: generation_pb2.GenerateRequest) -> tuple[grpc.StatusCode, str, list]:
    PACER.wait()
    try:
        response = stub.Generate(request, metadata=METADATA, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", []
    reasons = [c.finish_reason for c in response.choices] or [response.finish_reason]
    return grpc.StatusCode.OK, "", reasons


def call_stream(stub: generation_pb2_grpc.GenerationStub,
                request: generation_pb2.GenerateRequest) -> tuple[grpc.StatusCode, str, list]:
    reasons = []
    PACER.wait()
    try:
        for message in stub.GenerateStream(request, metadata=METADATA,
                                           timeout=CALL_TIMEOUT_S):
            if message.finish_reason:
                reasons.append(message.finish_reason)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", reasons
    return grpc.StatusCode.OK, "", reasons


def check_grpc(rpc: str, request: generation_pb2.GenerateRequest,
               outcome: tuple[grpc.StatusCode, str, list], tally: Tally) -> None:
    code, details, reasons = outcome
    tally.codes[f"{rpc} {code.name}"] += 1
    where = f"{rpc} answered {code.name}: {details!r}"
    assert code in CALLER_CODES, where
    if code != grpc.StatusCode.OK:
        tally.refusals[f"{code.name}: {details[:60]}"] += 1
        assert details.strip(), f"{rpc} answered {code.name} without a message"
    assert common_pb2.FINISH_REASON_ERROR not in reasons, f"{rpc} finished with ERROR"
    if code == grpc.StatusCode.OK:
        assert reasons, f"{rpc} succeeded without a finish reason"


@pytest.fixture(scope="module")
def stub(mesh):
    with grpc.insecure_channel(mesh.edge_address, options=[
            ("grpc.max_receive_message_length", 16 << 20)]) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


def fuzz_generation(stub, mesh, num_examples: int) -> None:
    tally = Tally()
    pool = ThreadPoolExecutor(2 * MAX_CONCURRENT_REQUESTS)

    @fuzz_settings(num_examples)
    @given(st.lists(generate_requests(), min_size=1, max_size=MAX_CONCURRENT_REQUESTS))
    def each(requests: list[generation_pb2.GenerateRequest]) -> None:
        # Both calls of every request at once: the worker batches them, as it would
        # batch many clients.
        unary = [pool.submit(call_unary, stub, r) for r in requests]
        stream = [pool.submit(call_stream, stub, r) for r in requests]
        for request, u, s in zip(requests, unary, stream, strict=True):
            check_grpc("Generate", request, u.result(), tally)
            check_grpc("GenerateStream", request, s.result(), tally)

    try:
        each()
    finally:
        pool.shutdown()
        print("\n" + tally.report("gRPC fuzz"))
    assert_healthy(mesh)


def test_generation_answers_every_request_with_a_caller_code(stub, mesh):
    fuzz_generation(stub, mesh, CI_GRPC_EXAMPLES)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_S)
def test_generation_fuzz_at_length(stub, mesh):
    fuzz_generation(stub, mesh, SLOW_EXAMPLES)


# --- the HTTP API -----------------------------------------------------------------------

def check_http(response: httpx.Response, body: bytes, tally: Tally) -> None:
    status = response.status_code
    tally.codes[f"HTTP {status}"] += 1
    where = f"HTTP {status} for {body[:300]!r}: {response.text[:300]!r}"
    assert 200 <= status < 300 or 400 <= status < 500 or status == 503, where
    if status >= 400:
        error = response.json().get("error")
        assert isinstance(error, dict), where
        assert isinstance(error.get("message"), str) and error["message"].strip(), where
        assert isinstance(error.get("type"), str), where
        tally.refusals[f"{status}: {error['message'][:60]}"] += 1
        return
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    tally.codes["HTTP stream error event"] += 1
                    assert event["error"].get("message"), where
    else:
        assert response.json()["choices"], where


def fuzz_http(mesh, num_examples: int) -> None:
    tally = Tally()
    url = f"http://{mesh.edge_address}/v1/chat/completions"
    headers = {"authorization": f"Bearer {OTHER_API_KEY}",
               "content-type": "application/json"}
    with httpx.Client(timeout=CALL_TIMEOUT_S, headers=headers) as client:

        @fuzz_settings(num_examples)
        @given(chat_completion_bodies())
        def each(body: bytes) -> None:
            PACER.wait()
            check_http(client.post(url, content=body), body, tally)

        try:
            each()
        finally:
            print("\n" + tally.report("HTTP fuzz"))
    assert_healthy(mesh)


def test_chat_completions_answer_every_body_with_2xx_4xx_or_503(mesh):
    fuzz_http(mesh, CI_EXAMPLES)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_S)
def test_chat_completions_fuzz_at_length(mesh):
    fuzz_http(mesh, SLOW_EXAMPLES)


# --- after ------------------------------------------------------------------------------

def assert_healthy(mesh) -> None:
    """Every process serving and never restarted; the worker idle, its KV pool free."""
    for status in mesh.supervisor.statuses():
        assert status.is_serving, f"{status.name} is not serving"
        assert status.record.num_restarts == 0, (
            f"{status.name} restarted (last exit: {status.record.last_exit})")
    stats = wait_idle(mesh)
    deadline = time.monotonic() + 5.0
    while stats.num_kv_blocks_free != stats.num_kv_blocks_total:
        assert time.monotonic() < deadline, (
            f"{stats.num_kv_blocks_total - stats.num_kv_blocks_free} KV blocks still held")
        time.sleep(0.05)
        stats = wait_idle(mesh)
