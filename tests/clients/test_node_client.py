"""The Node.js client (clients/node/chat.js) holding a Chat session through the mesh.

It loads the public .proto files with @grpc/proto-loader and talks to the Envoy edge
listener, so these tests prove that a gRPC implementation other than ours can use the
public API as published. They need `node` and the client's packages, installed with
`npm ci --prefix clients/node`; without them they skip.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENT_DIR = REPO_ROOT / "clients" / "node"
CHAT_JS = CLIENT_DIR / "chat.js"

# chat.js enforces its own deadline; the subprocess timeout only catches a client
# that fails to, so it is the longer of the two.
CHAT_TIMEOUT_MS = 90_000
SUBPROCESS_TIMEOUT_S = CHAT_TIMEOUT_MS / 1000 + 30

TURNS = ("Hi, who are you?", "And what can you do?")
COMPLETED = ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")

_NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(_NODE is None, reason="node is not on PATH"),
    pytest.mark.skipif(
        not (CLIENT_DIR / "node_modules").is_dir(),
        reason="clients/node/node_modules is missing: run `npm ci --prefix clients/node`",
    ),
]


def run_chat(mesh: Any, *args: str) -> dict[str, Any]:
    """Run chat.js against the mesh's edge with the two turns and return its JSON."""
    assert _NODE is not None  # guarded by pytestmark; narrows the type
    cmd = [_NODE, str(CHAT_JS), "--address", mesh.edge_address, "--model", mesh.model,
           "--timeout-ms", str(CHAT_TIMEOUT_MS), *args]
    for turn in TURNS:
        cmd += ["--turn", turn]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
                          cwd=REPO_ROOT, check=False)
    assert proc.returncode == 0, f"chat.js exited {proc.returncode}:\n{proc.stderr}"
    return json.loads(proc.stdout)


def assert_completed(turn: dict[str, Any]) -> None:
    assert turn["deltas"] >= 1, turn
    assert turn["text"].strip(), turn
    assert turn["finish_reason"] in COMPLETED, turn
    assert turn["usage"]["completion_tokens"] > 0, turn
    assert turn["request_id"], turn


def test_two_turn_chat_reuses_the_cached_history(mesh):
    result = run_chat(mesh, "--max-tokens", "16")

    assert result["errors"] == []
    turns = result["turns"]
    assert [t["turn"] for t in turns] == [1, 2]
    for turn in turns:
        assert_completed(turn)
    # The second turn resends the first turn and its answer, whose KV the worker's
    # prefix cache still holds.
    assert turns[1]["usage"]["cached_prompt_tokens"] > 0, turns[1]


def test_cancelled_turn_aborts_and_the_session_goes_on(mesh):
    result = run_chat(mesh, "--max-tokens", "64", "--cancel-after-deltas", "2")

    assert result["errors"] == []
    first, second = result["turns"]
    assert first["finish_reason"] == "FINISH_REASON_ABORT", first
    # The cancel goes out after the second delta; a few more may be in flight.
    assert first["deltas"] >= 2, first
    assert_completed(second)


def test_logprobs_come_with_the_deltas_of_every_turn(mesh):
    result = run_chat(mesh, "--max-tokens", "12", "--logprobs", "2")

    assert result["errors"] == []
    for turn in result["turns"]:
        assert_completed(turn)
        logprobs = turn["logprobs"]
        # Every token whose text reached the client, its bytes those of the text; the
        # end token (when it stopped the turn) is not among them.
        assert b"".join(bytes(t["bytes"]) for t in logprobs) == turn["text"].encode()
        num_tokens = turn["usage"]["completion_tokens"]
        assert len(logprobs) in (num_tokens, num_tokens - 1), turn
        for token in logprobs:
            assert token["logprob"] <= 0 and len(token["top_logprobs"]) == 2, token
            assert token["top_logprobs"][0]["logprob"] >= token["logprob"] - 1e-4, token


def test_a_stream_reset_under_the_call_is_unavailable_not_internal():
    # What a client sees when the frontend dies mid-response (measured by
    # `genmesh fault kill`): the mesh can only reset the stream, which gRPC reports as
    # INTERNAL "Received RST_STREAM"; chat.js reports it as retryable, as the SDK does.
    script = """
const {statusOf} = require('./chat.js');
const {status} = require('@grpc/grpc-js');
const show = (e) => { const s = statusOf(e); return [status[s.code], s.details]; };
console.log(JSON.stringify([
  show({code: status.INTERNAL, details: 'Received RST_STREAM with code 2'}),
  show({code: status.INTERNAL, details: 'a bug of ours'}),
  show({code: status.INVALID_ARGUMENT, details: 'max_tokens: must be >= 1'}),
]));
"""
    out = subprocess.run([_NODE or "node", "-e", script], cwd=CLIENT_DIR, capture_output=True,
                         text=True, timeout=30, check=True)
    (reset, bug, bad) = json.loads(out.stdout)
    assert reset[0] == "UNAVAILABLE" and "broke mid-call" in reset[1] and "RST_STREAM" in reset[1]
    assert bug == ["INTERNAL", "a bug of ours"]
    assert bad == ["INVALID_ARGUMENT", "max_tokens: must be >= 1"]
