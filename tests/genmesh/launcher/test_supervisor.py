"""The supervisor with tiny child processes (``python -c`` scripts): restarts under the
policy on a fake clock, what a restart leaves in the state file and `genmesh status`,
process groups, and the order and timeouts of a graceful stop."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import psutil
import pytest

from genmesh.cli import main as genmesh
from genmesh.launcher.plan import ProcessSpec, StopStage
from genmesh.launcher.ports import free_ports
from genmesh.launcher.probes import GrpcHealth
from genmesh.launcher.restarts import Exit, ProcessState, RestartPolicy
from genmesh.launcher.state import STATE_FILE, MeshState, ProcessRecord, read_state, write_state
from genmesh.launcher.supervisor import Supervisor

# A gRPC server whose health service answers SERVING (argv[1]: its address); with a
# second argument it first starts a grandchild (`sleep`) and writes its pid there, the
# way a worker starts its engine process.
HEALTH_SERVER = """
import subprocess, sys
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2_grpc
if len(sys.argv) > 2:
    child = subprocess.Popen(["sleep", "300"])
    open(sys.argv[2], "w").write(str(child.pid))
server = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.so_reuseport", 0)])
health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
server.add_insecure_port(sys.argv[1])
server.start()
server.wait_for_termination()
"""

# Logs SIGTERM's arrival to argv[1] ("<name> term <monotonic>"), takes argv[2] seconds
# to stop, logs its exit; or ignores SIGTERM when argv[2] is "ignore".
STOPPABLE = """
import signal, sys, time
log, name, linger = sys.argv[1], sys.argv[2], sys.argv[3]
def on_term(signum, frame):
    open(log, "a").write(f"{name} term {time.monotonic()}\\n")
    if linger == "ignore":
        return
    time.sleep(float(linger))
    open(log, "a").write(f"{name} exit {time.monotonic()}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
while True:
    time.sleep(0.05)
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def python(code: str, *args: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code, *args)


def never_serving() -> GrpcHealth:
    [port] = free_ports(1)
    return GrpcHealth(f"127.0.0.1:{port}")


def wait_exited(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Until ``proc`` has exited, leaving it for the supervisor to reap."""
    deadline = time.monotonic() + timeout_s
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)


def is_gone(pid: int, timeout_s: float = 2.0) -> bool:
    """Whether process ``pid`` ends within ``timeout_s`` (a zombie counts as ended: an
    orphan waits for its new parent, which here may never reap it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def test_an_exiting_process_is_restarted_with_backoff_until_its_budget_is_spent(tmp_path):
    crashy = ProcessSpec("crashy", python("import sys; sys.exit(3)"), "-", never_serving())
    clock, events = FakeClock(), list[str]()
    supervisor = Supervisor([crashy], run_dir=tmp_path, clock=clock, on_event=events.append,
                            policy=RestartPolicy(max_restarts=3, window_s=60.0))
    supervisor.start()
    try:
        seen = []  # (clock, state, restarts) after each poll
        for t in (0.0, 0.05, 0.1, 1.0, 1.4, 1.5, 2.0, 3.0, 4.0, 100.0):
            if supervisor.records()[0].state == ProcessState.STARTING:
                wait_exited(supervisor.procs["crashy"])
            clock.now = t
            supervisor.poll()
            [record] = read_state(tmp_path / STATE_FILE).processes
            seen.append((t, record.state, record.num_restarts))
            if t == 0.0:  # its 0.1 s backoff, not the 0.2 s interval, times the next poll
                assert supervisor.wait_s(0.2) == pytest.approx(0.1)
                clock.now = 0.05
                assert supervisor.wait_s(0.2) == pytest.approx(0.05)
            if t == 0.1:  # restarted: nothing due, the interval again
                assert supervisor.wait_s(0.2) == 0.2
        assert seen == [
            (0.0, "BACKOFF", 0),  # exited: back in 0.1 s
            (0.05, "BACKOFF", 0),
            (0.1, "STARTING", 1),
            (1.0, "BACKOFF", 1),  # exited again: back in 0.5 s
            (1.4, "BACKOFF", 1),
            (1.5, "STARTING", 2),
            (2.0, "BACKOFF", 2),  # back in 1 s
            (3.0, "STARTING", 3),
            (4.0, "FAILED", 3),  # a fourth exit within 60 s: left down
            (100.0, "FAILED", 3),  # and never restarted
        ]
        assert record.pid is None and record.last_exit is not None
        assert record.last_exit.describe() == "exit status 3"
        assert [e for e in events if "restarted" not in e][:3] == [
            "crashy exit status 3; restarting in 0.1 s (restart 1 of 3 allowed in 60 s)",
            "crashy exit status 3; restarting in 0.5 s (restart 2 of 3 allowed in 60 s)",
            "crashy exit status 3; restarting in 1 s (restart 3 of 3 allowed in 60 s)",
        ]
        assert events[-1].startswith("crashy exit status 3: FAILED, 3 restarts in 60 s used "
                                     "up; the rest of the mesh keeps serving")
    finally:
        supervisor.stop()


def test_a_killed_child_is_restarted_with_its_group_and_status_shows_it(tmp_path, capsys):
    [port] = free_ports(1)
    address = f"127.0.0.1:{port}"
    grandchild_file = tmp_path / "grandchild.pid"
    server = ProcessSpec("server", python(HEALTH_SERVER, address, str(grandchild_file)),
                         address, GrpcHealth(address))
    supervisor = Supervisor([server], run_dir=tmp_path)
    supervisor.start()
    try:
        assert supervisor.wait_ready(timeout_s=30)
        first_pid = supervisor.procs["server"].pid
        grandchild = int(grandchild_file.read_text())
        killed_at = time.monotonic()
        os.kill(first_pid, signal.SIGKILL)
        restarted_s: float | None = None
        serving_s: float | None = None
        while serving_s is None:
            supervisor.poll()
            [record] = supervisor.records()
            elapsed = time.monotonic() - killed_at
            if restarted_s is None and record.pid not in (None, first_pid):
                restarted_s = elapsed
            if record.state == ProcessState.RUNNING and record.pid != first_pid:
                serving_s = elapsed
            assert elapsed < 30, "not serving again within 30 s"
            time.sleep(0.05)
        with capsys.disabled():
            print(f"\nkilled -> restarted {restarted_s:.2f} s, serving again {serving_s:.2f} s")
        assert is_gone(grandchild)  # the old process's group went with it
        assert restarted_s is not None and 0.1 <= restarted_s < 2.0  # first backoff: 0.1 s
        capsys.readouterr()
        assert genmesh(["status", "--run-dir", str(tmp_path)]) == 0
        table = capsys.readouterr().out
        [row] = [line for line in table.splitlines() if line.startswith("server ")]
        assert row.split()[1:5] == [str(record.pid), address, "RUNNING", "1"]
        assert "killed by SIGKILL at " in row and row.endswith(" SERVING")
    finally:
        supervisor.stop()
    assert is_gone(int(grandchild_file.read_text()))  # the new grandchild too
    assert not (tmp_path / STATE_FILE).exists()


def test_status_reports_a_failed_process_and_a_vanished_supervisor(tmp_path, capsys):
    crashed = ProcessRecord("cache", None, "127.0.0.1:1", never_serving(),
                            ProcessState.FAILED.value, 5, Exit(-11, time.time() - 30))
    write_state(tmp_path / STATE_FILE, MeshState(os.getpid(), [crashed]))
    assert genmesh(["status", "--run-dir", str(tmp_path)]) == 1
    [row] = capsys.readouterr().out.splitlines()[1:]
    assert row.split()[:4] == ["cache", "-", "127.0.0.1:1", "FAILED"]
    assert "killed by SIGSEGV at" in row and "(30 s ago)" in row
    assert row.endswith("NOT SERVING")

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_state(tmp_path / STATE_FILE, MeshState(gone.pid, [crashed]))
    assert genmesh(["status", "--run-dir", str(tmp_path)]) == 1
    assert f"(pid {gone.pid}) is gone" in capsys.readouterr().err


class DrainRecorder(http.server.BaseHTTPRequestHandler):
    """Envoy's admin as far as a stop needs it: records each POST's path and time."""

    posts: ClassVar[list[tuple[str, float]]] = []

    def do_POST(self) -> None:
        self.posts.append((self.path, time.monotonic()))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_stop_drains_the_edge_then_stops_stage_by_stage(tmp_path):
    admin = http.server.HTTPServer(("127.0.0.1", 0), DrainRecorder)
    threading.Thread(target=admin.serve_forever, daemon=True).start()
    drain_url = f"http://127.0.0.1:{admin.server_port}/drain_listeners?inboundonly"
    log = tmp_path / "stops.log"

    def stoppable(name: str, stage: StopStage, linger_s: float, drain_url: str | None = None
                  ) -> ProcessSpec:
        return ProcessSpec(name, python(STOPPABLE, str(log), name, str(linger_s)), "-",
                           never_serving(), stop_stage=stage, drain_url=drain_url)

    # Listed in start order, which a stop no longer follows backwards.
    specs = [stoppable("redis", StopStage.STORE, 0.1),
             stoppable("tokenizer", StopStage.SERVICE, 0.1),
             stoppable("worker-v1", StopStage.WORKER, 0.2),
             stoppable("worker-v2", StopStage.WORKER, 0.4),
             stoppable("frontend", StopStage.FRONTEND, 0.5),
             stoppable("envoy", StopStage.GATEWAY, 0.1, drain_url=drain_url)]
    supervisor = Supervisor(specs, run_dir=tmp_path)
    supervisor.start()
    time.sleep(1.0)  # every child has installed its SIGTERM handler
    supervisor.stop()
    admin.shutdown()
    steps = [line.split() for line in log.read_text().splitlines()]
    order = [(name, what) for name, what, _ in steps]
    at = {(name, what): float(t) for name, what, t in steps}
    assert order[:2] == [("frontend", "term"), ("frontend", "exit")]
    assert set(order[2:6]) == {("worker-v1", "term"), ("worker-v2", "term"),
                               ("worker-v1", "exit"), ("worker-v2", "exit")}
    assert order[6:] == [("tokenizer", "term"), ("tokenizer", "exit"),
                         ("redis", "term"), ("redis", "exit"),
                         ("envoy", "term"), ("envoy", "exit")]
    # The two workers stop together: the second's SIGTERM does not wait for the first.
    assert at["worker-v2", "term"] < at["worker-v1", "exit"]
    [(path, drained_at)] = DrainRecorder.posts
    assert path == "/drain_listeners?inboundonly"
    assert drained_at < at["frontend", "term"]
    assert all(proc.poll() is not None for proc in supervisor.procs.values())


def test_a_process_that_ignores_sigterm_is_killed_with_its_group_after_its_timeout(tmp_path):
    log = tmp_path / "stops.log"
    stubborn = ProcessSpec("stubborn", python(STOPPABLE, str(log), "stubborn", "ignore"), "-",
                           never_serving(), stop_timeout_s=0.5)
    events: list[str] = []
    supervisor = Supervisor([stubborn], run_dir=tmp_path, on_event=events.append)
    supervisor.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    supervisor.stop()
    elapsed = time.monotonic() - t0
    assert 0.5 <= elapsed < 2.0
    assert supervisor.procs["stubborn"].returncode == -signal.SIGKILL
    assert "stubborn did not stop within 0.5 s: killed" in events


def test_a_second_signal_hurries_a_stop_and_nothing_restarts_while_stopping(tmp_path):
    log = tmp_path / "stops.log"
    stubborn = ProcessSpec("stubborn", python(STOPPABLE, str(log), "stubborn", "ignore"), "-",
                           never_serving(), stop_timeout_s=60)
    supervisor = Supervisor([stubborn], run_dir=tmp_path)
    supervisor.start()
    time.sleep(1.0)
    threading.Timer(0.3, supervisor.hurry).start()
    t0 = time.monotonic()
    supervisor.stop()
    assert time.monotonic() - t0 < 2.0  # not the 60 s grace
    pid = supervisor.procs["stubborn"].pid
    supervisor.poll()  # an exit seen after the stop is no reason to restart
    assert supervisor.procs["stubborn"].pid == pid
    assert supervisor.records()[0].state == ProcessState.STOPPED


@pytest.mark.parametrize("state", [ProcessState.BACKOFF, ProcessState.FAILED])
def test_a_stop_skips_what_is_already_down(tmp_path, state):
    crashy = ProcessSpec("crashy", python("import sys; sys.exit(1)"), "-", never_serving())
    clock = FakeClock()
    supervisor = Supervisor([crashy], run_dir=tmp_path, clock=clock,
                            policy=RestartPolicy(max_restarts=0 if state is
                                                 ProcessState.FAILED else 5))
    supervisor.start()
    wait_exited(supervisor.procs["crashy"])
    supervisor.poll()
    assert supervisor.records()[0].state == state
    t0 = time.monotonic()
    supervisor.stop()
    assert time.monotonic() - t0 < 1.0
    assert supervisor.records()[0].state == ProcessState.STOPPED


def test_the_state_file_is_replaced_whole(tmp_path: Path):
    record = ProcessRecord("redis", 42, "127.0.0.1:6390", never_serving(), "RUNNING")
    write_state(tmp_path / STATE_FILE, MeshState(7, [record]))
    assert read_state(tmp_path / STATE_FILE) == MeshState(7, [record])
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # no temporary left
