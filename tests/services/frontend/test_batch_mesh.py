"""GenerateBatch and `genmesh batch` end to end through Envoy (the session's mesh): results
tagged with the client's ids, bad items failing alone, batch work yielding to online
traffic (on a mesh of its own, below), and a resumable CLI."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from genmesh.cli import main as genmesh
from genmesh.client import AsyncClient, BatchItem, Client
from tests.conftest import RunningMesh, start_mesh

ONLINE_PROMPT = "Count to 3."  # its first token is text (some prompts end at once)


def ttft_ms(client: Client) -> float:
    t0 = time.perf_counter()
    for chunk in client.generate_stream(ONLINE_PROMPT, max_tokens=4, skip_cache=True):
        if chunk.text:
            return (time.perf_counter() - t0) * 1e3
    raise AssertionError("the stream produced no text")


def test_results_come_tagged_with_the_clients_ids_and_bad_items_fail_alone(mesh):
    items = [BatchItem(f"q{i}", prompt=f"Count to {i}.", params={"max_tokens": 6})
             for i in range(6)]
    items += [BatchItem("", prompt="no id"),
              BatchItem("bad-params", prompt="x", params={"max_tokens": -1}),
              BatchItem("chat", messages=[{"role": "user", "content": "Hi!"}],
                        params={"max_tokens": 4})]
    with Client(mesh.edge_address, timeout_s=120) as client:
        results = {r.id: r for r in client.generate_batch(items)}
    assert set(results) == {f"q{i}" for i in range(6)} | {"", "bad-params", "chat"}
    assert all(results[f"q{i}"].completion is not None for i in range(6))
    assert results["chat"].completion is not None and results["chat"].completion.text
    for bad in ("", "bad-params"):
        error = results[bad].error
        assert error is not None and error.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def fp32_mesh(model_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[RunningMesh]:
    """The session's mesh with the model in fp32, where the engine's steps are what the
    online call waits for. In bf16 on this 2-core machine the engine is 2-4x faster and
    the mesh's own work for the batch's requests (each new prompt's safety check,
    tokenizer, cache, Envoy: ~0.55 cores) weighs as much: online TTFT beside the batch
    came out at 1.4-2.07x its unloaded value there (2.02-2.07x in two of seven full
    runs), against 1.37-1.58x in fp32."""
    with start_mesh(tmp_path_factory.mktemp("fp32-mesh"), dtype="float32") as running:
        yield running


def test_a_batch_of_100_leaves_online_ttft_within_twice_its_unloaded_value(fp32_mesh):
    mesh = fp32_mesh
    with Client(mesh.edge_address, timeout_s=300) as client:
        ttft_ms(client)  # warm up
        unloaded = statistics.median(ttft_ms(client) for _ in range(9))
        items = [BatchItem(f"b{i}", prompt=f"Write a haiku about the number {i}.",
                           params={"max_tokens": 10}) for i in range(100)]
        results: list = []
        batch = threading.Thread(target=lambda: results.extend(client.generate_batch(items)))
        batch.start()
        time.sleep(1.0)  # the batch is running at full width
        loaded: list[float] = []
        while batch.is_alive() and len(loaded) < 9:
            loaded.append(ttft_ms(client))
            time.sleep(0.2)
        batch.join(timeout=300)
    print(f"online TTFT p50: unloaded {unloaded:.0f} ms, beside the batch "
          f"{statistics.median(loaded):.0f} ms ({len(loaded)} calls)")
    assert not batch.is_alive()
    assert len(results) == 100 and all(r.error is None for r in results)
    assert len(loaded) >= 5, "the batch ended before the online calls were measured"
    assert statistics.median(loaded) <= 2 * unloaded, (unloaded, loaded)


def test_the_cli_resumes_where_it_stopped(mesh, tmp_path: Path, capsys):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Say {i}.",
                                          "params": {"max_tokens": 4}}) + "\n"
                              for i in range(6)))
    # A previous run finished p0 and p1, failed p2, and was killed mid-line.
    out.write_text(json.dumps({"id": "p0", "text": "zero"}) + "\n"
                   + json.dumps({"id": "p1", "text": "one"}) + "\n"
                   + json.dumps({"id": "p2", "error": {"code": "UNAVAILABLE"}}) + "\n"
                   + '{"id": "p3", "te')
    argv = ["batch", str(source), "-o", str(out), "--address", mesh.edge_address,
            "--no-progress"]
    assert genmesh(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == [f"p{i}" for i in range(6)]
    assert rows[0] == {"id": "p0", "text": "zero"}  # kept, not rerun
    assert all("error" not in r for r in rows)
    assert "4 done, 0 failed" in capsys.readouterr().err
    assert genmesh(argv) == 0  # nothing left to do
    assert "0 done, 0 failed" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 6


def test_the_cli_names_a_bad_input_line(tmp_path: Path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "ok"}\n{"prompt": "a", "messages": []}\n')
    assert genmesh(["batch", str(source), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "in.jsonl:2: give exactly one of prompt or messages" in capsys.readouterr().err


def test_the_async_client_runs_batches_and_jobs(mesh):
    async def run() -> None:
        async with AsyncClient(mesh.edge_address, timeout_s=120) as client:
            items = [BatchItem(f"a{i}", prompt=f"Count to {i}.", params={"max_tokens": 4})
                     for i in range(3)]
            results = [r async for r in client.generate_batch(items)]
            assert sorted(r.id for r in results) == ["a0", "a1", "a2"]
            assert all(r.completion is not None for r in results)
            job = await client.submit_job("Count to 5.", max_tokens=6)
            states = [j async for j in client.watch_job(job.job_id)]
            assert states[-1].state == "succeeded" and states[-1].result is not None
            assert (await client.get_job(job.job_id)).state == "succeeded"

    asyncio.run(run())


def test_batch_items_and_jobs_answer_with_logprobs_and_n_choices(mesh):
    with Client(mesh.edge_address, timeout_s=120) as client:
        [result] = client.generate_batch([BatchItem(
            "lp", prompt="Count to 3.", n=2, priority="normal",
            params={"max_tokens": 4, "logprobs": 1, "temperature": 0.7, "seed": 3})])
        job = client.submit_job("Count to 5.", max_tokens=4, return_logprobs=True)
        states = list(client.watch_job(job.job_id))
    for completion in (result.completion, states[-1].result):
        assert completion is not None and completion.logprobs
        assert b"".join(t.token_bytes for t in completion.logprobs) == completion.text.encode()
    assert result.completion is not None and len(result.completion.choices) == 2
    assert all(len(t.top_logprobs) == 1 for c in result.completion.choices for t in c.logprobs)
