"""`genmesh generate` and `genmesh chat` against the running mesh, as a user runs them."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from genmesh.cli import main as genmesh
from tests.procs import REPO_ROOT


def test_generate_streams_to_stdout(mesh, capsys):
    assert genmesh(["generate", "--address", mesh.edge_address, "--max-tokens", "8",
                    "The capital of France is"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "8 completion tokens" in err


def test_chat_with_turns_from_the_command_line(mesh, capsys):
    assert genmesh(["chat", "--address", mesh.edge_address, "--max-tokens", "12",
                    "Hello!", "What did I just say?"]) == 0
    out, err = capsys.readouterr()
    assert out.strip()
    assert err.count("completion tokens]") == 2
    assert "> What did I just say?" in err


def test_bad_input_is_a_message_not_a_traceback(mesh, capsys):
    assert genmesh(["generate", "--address", mesh.edge_address, "--model", "nope", "x"]) == 1
    err = capsys.readouterr().err
    assert "NOT_FOUND" in err and "Traceback" not in err


# `genmesh chat` with Ctrl-C as a terminal sends it, whatever the suite inherited: a shell
# starts a background job ("make test &") with SIGINT ignored, and a Python started with
# SIGINT ignored keeps it ignored (no KeyboardInterrupt). Set in the child's own code: a
# preexec_fn would make Popen fork this process, whose gRPC threads do not survive a fork.
_CHAT_WITH_CTRL_C = ("import runpy, signal; "
                     "signal.signal(signal.SIGINT, signal.default_int_handler); "
                     "runpy.run_module('genmesh.cli', run_name='__main__', alter_sys=True)")


def test_interactive_chat_ctrl_c_cancels_the_answer_and_the_session_goes_on(mesh):
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHAT_WITH_CTRL_C, "chat", "--address", mesh.edge_address,
         "--max-tokens", "48", "--ignore-eos"], cwd=REPO_ROOT, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write("Write a very long poem about the sea.\n")
        proc.stdin.flush()
        proc.stdout.read(20)  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        _, err = proc.communicate("Thanks. Say ok.\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "[abort:" in err  # the first turn was cancelled
    assert err.count("completion tokens]") == 2  # and the second one ran
