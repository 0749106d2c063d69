"""`genmesh up` as a user runs it, with the real mesh (Envoy, Redis, every service, the
default model): it serves every process of deploy/local.yaml, a killed process comes back
while the rest keep serving, and a stop by Ctrl-C (SIGINT), by SIGTERM, or by SIGINT when
it runs in the background, lets in-flight streams finish before every process exits.

The default suite starts one `genmesh up` for the module (a start is ~10 s of the two
cores): its tests run in file order, and the last one stops it. The other two ways to
stop it are slow-marked, each on a mesh of its own."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest

from genmesh.cli import main as genmesh
from genmesh.client import Client
from genmesh.client.types import Chunk, GenmeshError
from genmesh.launcher.plan import PORT_FIELDS
from genmesh.launcher.ports import free_ports
from genmesh.launcher.prometheus import prometheus_binary
from genmesh.launcher.restarts import ProcessState
from genmesh.launcher.state import STATE_FILE, ProcessRecord, read_state
from tests.procs import REPO_ROOT

NUM_STREAMS = 4
MAX_TOKENS = 32
HAS_PROMETHEUS = prometheus_binary() is not None
# Generous: on a shared 2-core machine 4 streams of the mesh may get ~1 token/s each.
STOP_GRACE_S = 90


@dataclass
class Up:
    """A running `genmesh up` and what it printed."""

    proc: subprocess.Popen
    pid: int  # genmesh up's own (the shell's child when started in the background)
    run_dir: Path
    edge: str
    admin_url: str  # Envoy's
    stdout: list[str] = field(default_factory=list)

    def pids(self) -> dict[str, int]:
        return {r.name: r.pid for r in self.records().values() if r.pid is not None}

    def records(self) -> dict[str, ProcessRecord]:
        return {r.name: r for r in read_state(self.run_dir / STATE_FILE).processes}

    def stderr(self) -> str:
        return (self.run_dir / "up.stderr").read_text()


@contextmanager
def genmesh_up(run_dir: Path, *, in_background: bool = False,
               every_version: bool = False) -> Iterator[Up]:
    """`genmesh up` of deploy/local.yaml on free ports, serving: its first version alone,
    without Prometheus, or with ``every_version`` every version and Prometheus when it is
    installed; killed at the end if the test did not stop it."""
    ports = dict(zip(PORT_FIELDS, free_ports(len(PORT_FIELDS)), strict=True))
    argv = [sys.executable, "-m", "genmesh.cli", "up", "--quiet",
            "--kv-cache-gib", "0.1", "--stop-grace", str(STOP_GRACE_S),
            "--run-dir", str(run_dir)]
    if not every_version:
        argv += ["--versions", "v1", "--no-prometheus"]
    for name, port in ports.items():
        argv += [f"--{name.replace('_', '-')}", str(port)]
    if in_background:
        # A non-interactive shell starts a background job with SIGINT ignored.
        argv = ["bash", "-c", '"$@" & echo "pid $!"; wait', "bash", *argv]
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "up.stderr", "w") as stderr:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=stderr,
                                text=True)
    assert proc.stdout is not None
    up = Up(proc, proc.pid, run_dir, f"127.0.0.1:{ports['edge_port']}",
            f"http://127.0.0.1:{ports['admin_port']}")
    lines = proc.stdout
    reader = threading.Thread(target=lambda: up.stdout.extend(iter(lines.readline, "")),
                              daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        # The status table is printed once every process serves; envoy is its last row.
        while not any(line.startswith("envoy") for line in up.stdout):
            assert proc.poll() is None, up.stderr()
            assert time.monotonic() < deadline, "the mesh did not start"
            time.sleep(0.2)
        if in_background:
            up.pid = int(up.stdout[0].split()[1])
        yield up
    finally:
        if proc.poll() is None:
            psutil.Process(up.pid).send_signal(signal.SIGTERM)
            proc.wait(timeout=STOP_GRACE_S + 60)


def is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def with_children(pids: list[int]) -> list[int]:
    """``pids`` and every process below them (a worker's engine process)."""
    out = list(pids)
    for pid in pids:
        out += [c.pid for c in psutil.Process(pid).children(recursive=True)]
    return out


def wait_until_served(edge: str, t0: float, timeout_s: float = 120) -> float:
    """Seconds from ``t0`` until a generation through the edge succeeds."""
    with Client(edge, timeout_s=10) as client:
        while True:
            try:
                client.generate("Say hi.", max_tokens=2, skip_cache=True)
                return time.monotonic() - t0
            except GenmeshError:
                assert time.monotonic() - t0 < timeout_s, "the mesh does not serve again"
                time.sleep(0.05)


def healthy_hosts(admin_url: str, cluster: str) -> int:
    """Envoy's count of the cluster's hosts in rotation (health checks and outlier
    detection both count)."""
    with urllib.request.urlopen(f"{admin_url}/stats?filter=^cluster.{cluster}."
                                "membership_healthy$", timeout=2) as reply:
        return int(reply.read().decode().split(": ")[1])


@dataclass
class Recovery:
    """Seconds from a kill: restarted (a new pid in the state file), RUNNING there, and
    when Envoy had the cluster's one host out of rotation (None: never seen out)."""

    restarted_s: float
    running_s: float
    out_of_rotation_s: float | None


def wait_restarted(up: Up, name: str, old_pid: int, t0: float) -> Recovery:
    restarted_s = out_s = None
    while True:
        record = up.records()[name]
        elapsed = time.monotonic() - t0
        if out_s is None and healthy_hosts(up.admin_url, name) == 0:
            out_s = elapsed
        if restarted_s is None and record.pid not in (None, old_pid):
            restarted_s = elapsed
        if restarted_s is not None and record.state == ProcessState.RUNNING:
            return Recovery(restarted_s, elapsed, out_s)
        assert elapsed < 120, f"{name} is not running again: {record}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def up(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """deploy/local.yaml as `genmesh up` runs it by default: every version, Prometheus
    when installed. The module's last test stops it."""
    with genmesh_up(tmp_path_factory.mktemp("up") / "run", every_version=True) as running:
        yield running


def test_every_process_of_the_deployment_serves_and_status_shows_them(up, capsys):
    # deploy/local.yaml: two versions (a worker each), the six services, Redis and Envoy;
    # Prometheus when it is installed. The status table printed once all of them serve.
    assert sum(" SERVING" in line for line in up.stdout) == 10 + HAS_PROMETHEUS
    capsys.readouterr()
    assert genmesh(["status", "--run-dir", str(up.run_dir)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert {"worker-v1", "worker-v2", "frontend", "envoy"} <= rows.keys()
    assert all(rows[name].split()[3] == "RUNNING" for name in ("worker-v1", "worker-v2"))


def test_a_killed_worker_or_tokenizer_is_restarted_while_the_rest_keep_serving(up, capsys):
    for name in ("tokenizer", "worker-v1"):
        pid = up.pids()[name]
        group = with_children([pid])
        t0 = time.monotonic()
        psutil.Process(pid).kill()
        with ThreadPoolExecutor(1) as pool:  # calls through the edge meanwhile
            served = pool.submit(wait_until_served, up.edge, t0)
            recovery = wait_restarted(up, name, pid, t0)
            served_s = served.result(timeout=120)
        with capsys.disabled():
            print(f"\n{name}: SIGKILL -> {recovery}, a call through the edge served "
                  f"{served_s:.2f} s")
        assert healthy_hosts(up.admin_url, name) == 1  # Envoy has it back
        assert all(is_gone(p) for p in group)  # the engine process went with it
        assert up.proc.poll() is None  # the mesh was never stopped
    capsys.readouterr()
    assert genmesh(["status", "--run-dir", str(up.run_dir)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    for name in ("tokenizer", "worker-v1"):
        assert rows[name].split()[3:5] == ["RUNNING", "1"]
        assert "killed by SIGKILL at" in rows[name]
    assert rows["frontend"].split()[3:5] == ["RUNNING", "0"]
    assert "genmesh: worker-v1 killed by SIGKILL; restarting in 0.1 s" in up.stderr()


def stream_until_done(edge: str, started: threading.Barrier) -> list[Chunk]:
    """One long generation; waits at ``started`` once its first text arrived."""
    chunks: list[Chunk] = []
    with Client(edge, timeout_s=120) as client:
        for chunk in client.generate_stream("Count slowly from one to one hundred.",
                                            max_tokens=MAX_TOKENS, ignore_eos=True,
                                            skip_cache=True):
            chunks.append(chunk)
            if len([c for c in chunks if c.text]) == 1:
                started.wait(timeout=120)
    return chunks


def stop_with_streams_in_flight(up: Up, stop_signal: signal.Signals, capsys) -> None:
    """Stop ``up`` by ``stop_signal`` while NUM_STREAMS streams run: each finishes, a new
    call is refused as UNAVAILABLE, every process exits, in stage order."""
    pids = with_children(list(up.pids().values()))
    started = threading.Barrier(NUM_STREAMS + 1)
    with ThreadPoolExecutor(NUM_STREAMS) as pool:
        streams = [pool.submit(stream_until_done, up.edge, started)
                   for _ in range(NUM_STREAMS)]
        started.wait(timeout=120)  # every stream has its first text
        t0 = time.monotonic()
        psutil.Process(up.pid).send_signal(stop_signal)
        time.sleep(1.0)
        with pytest.raises(GenmeshError) as refused, Client(up.edge, timeout_s=5) as late:
            late.generate("Too late?", max_tokens=2)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        results = [s.result(timeout=STOP_GRACE_S) for s in streams]
        finished_s = time.monotonic() - t0
    up.proc.wait(timeout=60)
    exited_s = time.monotonic() - t0
    with capsys.disabled():
        print(f"\n{signal.Signals(stop_signal).name}: {NUM_STREAMS} streams in flight "
              f"finished {finished_s:.2f} s after the signal; genmesh up exited after "
              f"{exited_s:.2f} s")
    for chunks in results:
        assert chunks[-1].finish_reason == "length"
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert up.proc.returncode == 0, up.stderr()
    assert all(is_gone(pid) for pid in pids)
    assert not (up.run_dir / STATE_FILE).exists()
    err = up.stderr()
    assert err.index("envoy stopped taking new calls") < err.index("stopped frontend")
    assert err.index("stopped frontend") < err.index("stopped worker-v1")
    assert err.index("stopped worker-v1") < err.index("stopped envoy")


def test_ctrl_c_lets_in_flight_streams_finish_then_stops_every_process(up, capsys):
    """The module's mesh, stopped as a user does, by Ctrl-C in its terminal (last test)."""
    stop_with_streams_in_flight(up, signal.SIGINT, capsys)


@pytest.mark.slow  # the same path as Ctrl-C's, each on a mesh of its own
@pytest.mark.parametrize("stop_signal,in_background", [
    (signal.SIGTERM, False), (signal.SIGINT, True)], ids=["SIGTERM", "SIGINT-in-background"])
def test_in_flight_streams_finish_when_genmesh_up_is_stopped(
        model_dir, tmp_path, capsys, stop_signal, in_background):
    with genmesh_up(tmp_path / "run", in_background=in_background) as up:
        stop_with_streams_in_flight(up, stop_signal, capsys)
