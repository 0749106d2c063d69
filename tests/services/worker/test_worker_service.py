"""The worker as a real process, over gRPC."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from genmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.procs import free_port, service


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    args = ["--port", str(port), "--model", "tiny-llama", "--load-format", "dummy",
            "--dtype", "bfloat16", "--model-version", "v7", "--kv-cache-gib", "0.01"]
    with service("services.worker.main", args, port=port, log_path=log) as proc:
        yield f"127.0.0.1:{port}", proc, log


def stub(address: str) -> worker_pb2_grpc.WorkerStub:
    return worker_pb2_grpc.WorkerStub(grpc.insecure_channel(address))


def test_generate_streams_tokens_then_finish_and_usage(worker):
    address, _, _ = worker
    req = worker_pb2.WorkerGenerateRequest(
        request_id="t1", prompt_ids=[5, 6, 7, 8],
        params=common_pb2.SamplingParams(max_tokens=6, ignore_eos=True))
    replies = list(stub(address).Generate(req, timeout=30))
    # One token per step; tokens of steps that piled up behind a send share a reply.
    assert sum(len(r.token_ids) for r in replies) == 6
    assert all(r.token_ids for r in replies)
    assert replies[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (replies[-1].usage.prompt_tokens, replies[-1].usage.completion_tokens) == (4, 6)


@pytest.mark.parametrize(("prompt", "params", "field"), [
    ([], common_pb2.SamplingParams(), "prompt_ids"),
    ([5, 99999], common_pb2.SamplingParams(), "prompt_ids"),
    ([5], common_pb2.SamplingParams(max_tokens=-1), "max_tokens"),
    ([5], common_pb2.SamplingParams(temperature=-1), "temperature"),
    ([5], common_pb2.SamplingParams(top_p=1.5), "top_p"),
])
def test_bad_input_is_invalid_argument_naming_the_field(worker, prompt, params, field):
    address, _, _ = worker
    with pytest.raises(grpc.RpcError) as err:
        list(stub(address).Generate(
            worker_pb2.WorkerGenerateRequest(prompt_ids=prompt, params=params), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


def test_cancelling_the_call_frees_the_kv_blocks(worker):
    address, _, _ = worker
    s = stub(address)
    idle = s.GetStats(worker_pb2.GetStatsRequest(), timeout=5)
    call = s.Generate(worker_pb2.WorkerGenerateRequest(
        prompt_ids=list(range(3, 200)),
        params=common_pb2.SamplingParams(max_tokens=1500, ignore_eos=True)), timeout=30)
    next(call)
    busy = s.GetStats(worker_pb2.GetStatsRequest(), timeout=5)
    assert busy.num_running == 1 and busy.num_kv_blocks_free < idle.num_kv_blocks_free
    t0 = time.monotonic()
    call.cancel()
    while s.GetStats(worker_pb2.GetStatsRequest(), timeout=5).num_running:
        assert time.monotonic() - t0 < 1.0, "blocks not freed within a second"
        time.sleep(0.01)
    after = s.GetStats(worker_pb2.GetStatsRequest(), timeout=5)
    assert after.num_kv_blocks_free == idle.num_kv_blocks_free
    assert (after.model, after.model_version) == ("tiny-llama", "v7")


def test_logs_are_json_and_sigterm_lets_in_flight_streams_finish(tmp_path):
    port = free_port()
    log = tmp_path / "worker.log"
    args = ["--port", str(port), "--model", "tiny-llama", "--load-format", "dummy",
            "--dtype", "bfloat16", "--shutdown-grace-s", "10"]
    with service("services.worker.main", args, port=port, log_path=log) as proc:
        call = stub(f"127.0.0.1:{port}").Generate(worker_pb2.WorkerGenerateRequest(
            prompt_ids=[5, 6], params=common_pb2.SamplingParams(max_tokens=100,
                                                                ignore_eos=True)), timeout=60)
        next(call)
        proc.send_signal(signal.SIGTERM)
        rest = list(call)  # the stream runs to its end during the grace period
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert proc.wait(timeout=20) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert {"serving", "stopping", "stopped"} <= {entry["msg"] for entry in lines}


def test_a_dead_engine_core_ends_streams_and_the_worker_exits_non_zero(tmp_path):
    """The core runs in a child process; if it dies, the open stream ends with an error
    delta and the worker stops (non-zero) so its supervisor restarts it."""
    port = free_port()
    log = tmp_path / "worker.log"
    args = ["--port", str(port), "--model", "tiny-llama", "--load-format", "dummy",
            "--dtype", "bfloat16"]
    with service("services.worker.main", args, port=port, log_path=log) as proc:
        core = [pid for pid in _children(proc.pid) if b"spawn_main" in _cmdline(pid)]
        assert len(core) == 1
        call = stub(f"127.0.0.1:{port}").Generate(worker_pb2.WorkerGenerateRequest(
            prompt_ids=[5, 6], params=common_pb2.SamplingParams(max_tokens=100_000,
                                                                ignore_eos=True)), timeout=60)
        next(call)
        os.kill(core[0], signal.SIGKILL)
        last = list(call)[-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_ERROR
        assert last.error == "the engine process exited (code -9)"
        assert proc.wait(timeout=20) == 1
    assert "the engine process exited (code -9)" in log.read_text()


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()
