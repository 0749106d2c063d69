"""Traces and metrics end to end, on a mesh of this module's own whose Envoy and services
export spans to an OTLP receiver run by the test (``tests/otlp.py``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from genmesh.client import Client
from genmesh.launcher.plan import PORT_FIELDS, MeshConfig
from genmesh.launcher.ports import free_ports
from tests.conftest import DEFAULT_MODEL, mesh_deployment
from tests.otlp import OtlpReceiver, ReceivedSpan
from tests.procs import launched

FRONTEND_STAGES = {"tokenize", "prompt_check", "budget", "cache_lookup", "generate",
                   "detokenize", "moderation", "cache_store"}
WORKER_STAGES = {"queue", "prefill", "decode"}
TURN = "genmesh.v1.Generation/Chat turn"
SERVICES = {"genmesh-envoy-edge", "genmesh-envoy-mesh", "genmesh-frontend", "genmesh-tokenizer",
            "genmesh-safety", "genmesh-cache", "genmesh-worker-v1"}


@dataclass
class TracedMesh:
    config: MeshConfig
    receiver: OtlpReceiver


@pytest.fixture(scope="module")
def traced(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TracedMesh]:
    run_dir = tmp_path_factory.mktemp("traced-mesh")
    ports = dict(zip(PORT_FIELDS, free_ports(len(PORT_FIELDS)), strict=True))
    with OtlpReceiver() as receiver:
        config = MeshConfig(**ports, model=DEFAULT_MODEL, versions=("v1",), kv_cache_gib=0.25,
                            run_dir=run_dir, safety_embedding=False, with_prometheus=False,
                            otlp_endpoint=receiver.endpoint,
                            deployment=mesh_deployment(run_dir / "source.yaml"))
        with launched(config):
            yield TracedMesh(config, receiver)


def by_id(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {s.span_id: s for s in spans}


def ancestors(span: ReceivedSpan, index: dict[str, ReceivedSpan]) -> list[ReceivedSpan]:
    out = []
    while span.parent_span_id:
        span = index[span.parent_span_id]
        out.append(span)
    return out


def test_one_chat_turn_is_one_trace_through_envoy_and_every_service(traced):
    secret = f"my locker code is {uuid.uuid4().hex[:10]}"
    with Client(traced.config.edge_address, timeout_s=60) as client, \
            client.chat(max_tokens=8) as chat:
        list(chat.turn(f"Say hello. ({secret})"))

    def complete(spans: list[ReceivedSpan]) -> bool:
        """Every stage and every service's spans arrived, and every span's parent
        (processes export on their own schedules: Envoy every few seconds)."""
        turns = [s for s in spans if s.name == TURN]
        if not turns:
            return False
        trace = [s for s in spans if s.trace_id == turns[-1].trace_id]
        ids = {s.span_id for s in trace}
        return ({s.name for s in trace} >= (FRONTEND_STAGES | WORKER_STAGES)
                and {s.service for s in trace} >= SERVICES
                and any(not s.parent_span_id for s in trace)
                and all(not s.parent_span_id or s.parent_span_id in ids for s in trace))

    spans = traced.receiver.wait_for(complete, timeout_s=30)
    turn = [s for s in spans if s.name == TURN][-1]
    trace = traced.receiver.trace(turn.trace_id)
    index = by_id(trace)
    assert {s.service for s in trace} >= SERVICES

    # Parent links: one root (Envoy's edge span), every other parent in the trace.
    roots = [s for s in trace if not s.parent_span_id]
    assert [r.service for r in roots] == ["genmesh-envoy-edge"]
    assert all(not s.parent_span_id or s.parent_span_id in index for s in trace)
    assert index[turn.parent_span_id].service == "genmesh-envoy-edge"
    for stage in FRONTEND_STAGES:
        span = next(s for s in trace if s.name == stage)
        assert turn in ancestors(span, index), stage
    for stage in WORKER_STAGES:  # under the worker's server span, under "generate"
        span = next(s for s in trace if s.name == stage)
        chain = ancestors(span, index)
        assert chain[0].service == "genmesh-worker-v1"
        assert any(s.name == "generate" for s in chain)
        assert any(s.service == "genmesh-envoy-mesh" for s in chain)  # through the mesh
    tokenizer = [s for s in trace if s.service == "genmesh-tokenizer"]
    assert any(any(a.name == "tokenize" for a in ancestors(s, index)) for s in tokenizer)
    safety = [s for s in trace if s.service == "genmesh-safety"]
    assert any(any(a.name == "prompt_check" for a in ancestors(s, index)) for s in safety)
    queue, prefill, decode = (next(s for s in trace if s.name == n) for n in
                              ("queue", "prefill", "decode"))
    assert queue.start_ns <= prefill.start_ns <= decode.start_ns

    # GenAI attributes, and never the prompt text.
    assert turn.attributes["gen_ai.request.model"] == DEFAULT_MODEL
    assert turn.attributes["gen_ai.usage.output_tokens"] > 0
    assert turn.attributes["gen_ai.response.finish_reasons"] in (["stop"], ["length"])
    assert all(secret not in str(s.attributes) for s in trace)


def test_each_chat_turn_is_a_span_of_its_own(traced):
    with Client(traced.config.edge_address, timeout_s=60) as client, \
            client.chat(max_tokens=4) as chat:
        for i in range(2):
            list(chat.turn(f"Count to {i + 2}. ({uuid.uuid4().hex[:6]})"))
    spans = traced.receiver.wait_for(
        lambda spans: len([s for s in spans if s.name == TURN]) >= 3, timeout_s=30)
    turns = [s for s in spans if s.name == TURN][-2:]
    assert [t.attributes["genmesh.turn"] for t in turns] == [1, 2]
    assert turns[0].trace_id == turns[1].trace_id  # one session: one trace, a span per turn
    assert turns[0].end_ns <= turns[1].start_ns
