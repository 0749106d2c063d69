"""Runs the planned processes: start, wait for health, copy their logs, restart what
exits, stop gracefully.

Children run in their own sessions (one process group each), so a Ctrl-C reaches only
the supervisor, and a child is ended with everything it started (a worker's engine
process). Once the mesh serves, a process that exits is restarted under a restart
policy (``restarts.py``) and the rest keep serving. A stop goes in ``StopStage`` order:
the edge refuses new connections, the frontends drain their streams, then the workers,
the services, Redis, and Envoy last; every wait has a timeout, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from genmesh.launcher.plan import ProcessSpec
from genmesh.launcher.restarts import Exit, ProcessState, RestartBudget, RestartPolicy
from genmesh.launcher.state import (
    STATE_FILE,
    MeshState,
    ProcessRecord,
    ProcessStatus,
    write_state,
)

__all__ = ["STATE_FILE", "ProcessFailedError", "ProcessStatus", "Supervisor", "terminate"]

LogSink = Callable[[str, str], None]  # (process name, one line of its output)
EventSink = Callable[[str], None]  # one line about the supervisor's own doing

PROBE_INTERVAL_S = 0.5  # how often a restarted process is asked whether it serves
DRAIN_TIMEOUT_S = 2.0  # for the gateway's admin to answer a drain request
REAP_TIMEOUT_S = 5.0  # for a SIGKILLed process to be reaped


def terminate(proc: subprocess.Popen, *, grace_s: float) -> None:
    """SIGTERM, ``grace_s`` seconds to exit (a graceful drain), then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


class ProcessFailedError(RuntimeError):
    """A process exited while the mesh was starting."""


@dataclass(slots=True)
class _Supervised:
    """What the supervisor knows of one process besides its ``Popen`` (``procs``)."""

    spec: ProcessSpec
    budget: RestartBudget
    state: ProcessState = ProcessState.STARTING
    last_exit: Exit | None = None
    exited_at: float = 0.0  # clock time of its latest exit while the mesh served
    restart_at: float = 0.0  # clock time its backoff ends (state BACKOFF)
    next_probe_at: float = 0.0  # clock time of its next probe (state STARTING)
    copiers: list[threading.Thread] = field(default_factory=list)


class Supervisor:
    """``clock`` (monotonic seconds) times restarts; tests pass a fake one. ``on_event``
    gets a line for each exit, restart, failure and stop step."""

    def __init__(self, specs: list[ProcessSpec], *, run_dir: Path,
                 sink: LogSink | None = None, env: dict[str, str] | None = None,
                 on_event: EventSink | None = None, policy: RestartPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.specs = specs
        self.run_dir = run_dir
        self.sink = sink
        self.on_event = on_event
        self.env = {**os.environ, **(env or {})}
        self.policy = policy or RestartPolicy()
        self.clock = clock
        self.procs: dict[str, subprocess.Popen] = {}  # the latest process of each spec
        self._supervised = {s.name: _Supervised(s, RestartBudget(self.policy)) for s in specs}
        self._lock = threading.Lock()  # poll() against stop(), which may run in two threads
        self._is_stopping = False
        self._hurry = threading.Event()

    def log_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for spec in self.specs:
            self._spawn(self._supervised[spec.name])
        self._write_state()

    def wait_ready(self, timeout_s: float, until: threading.Event | None = None) -> bool:
        """True when every process is serving; False if ``until`` was set first. Raises
        ProcessFailedError (a process exited: while starting, a restart would not help;
        the message carries the tail of its log) or TimeoutError (naming who is not
        ready)."""
        deadline = time.monotonic() + timeout_s
        stop_waiting = until or threading.Event()
        pending = list(self.specs)
        while pending:
            self.check_alive()
            pending = [s for s in pending if not s.probe()]
            if not pending:
                break
            if time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                raise TimeoutError(f"not serving after {timeout_s:.0f} s: {names} "
                                   f"(logs in {self.run_dir})")
            if stop_waiting.wait(0.2):
                return False
        with self._lock:
            for sup in self._supervised.values():
                sup.state = ProcessState.RUNNING
            self._write_state()
        return True

    def check_alive(self) -> None:
        """Raises ProcessFailedError if a process has exited (used while starting)."""
        for name, proc in self.procs.items():
            if _has_exited(proc):
                _reap(proc)
                raise ProcessFailedError(
                    f"{name} exited with status {proc.returncode}; last lines of "
                    f"{self.log_path(name)}:\n{self.log_tail(name)}")

    def supervise(self, until: threading.Event, interval_s: float = 0.2) -> None:
        """``poll()`` every ``interval_s``, or sooner when a restart is due sooner (a
        backoff shorter than the interval is not stretched to it), until ``until`` is
        set."""
        while not until.wait(self.wait_s(interval_s)):
            self.poll()

    def wait_s(self, interval_s: float) -> float:
        """How long ``supervise`` waits before its next ``poll()``: ``interval_s``, or
        until the earliest restart that is due sooner."""
        with self._lock:
            due = [sup.restart_at for sup in self._supervised.values()
                   if sup.state is ProcessState.BACKOFF]
        if not due:
            return interval_s
        return max(0.0, min(interval_s, min(due) - self.clock()))

    def poll(self) -> None:
        """One round of supervision: note who exited (restart later, or FAILED once its
        budget is spent), restart whose backoff has ended, notice a restarted process
        serving again. Nothing happens once the mesh is stopping."""
        with self._lock:
            if self._is_stopping:
                return
            is_changed = False
            for sup in self._supervised.values():
                is_changed |= self._step(sup, self.clock())
            if is_changed:
                self._write_state()

    def _step(self, sup: _Supervised, now: float) -> bool:
        name = sup.spec.name
        proc = self.procs.get(name)
        if (sup.state in (ProcessState.STARTING, ProcessState.RUNNING) and proc is not None
                and _has_exited(proc)):
            self._on_exit(sup, _reap(proc), now)
            return True
        if sup.state is ProcessState.BACKOFF and now >= sup.restart_at:
            sup.budget.record_restart(now)
            self._spawn(sup)
            sup.state = ProcessState.STARTING
            self._event(f"{name} restarted (pid {self.procs[name].pid}, restart "
                        f"{sup.budget.num_restarts})")
            return True
        if sup.state is ProcessState.STARTING and now >= sup.next_probe_at:
            sup.next_probe_at = now + PROBE_INTERVAL_S
            if sup.spec.probe():
                sup.state = ProcessState.RUNNING
                self._event(f"{name} serving again, {now - sup.exited_at:.1f} s after it "
                            "exited")
                return True
        return False

    def _on_exit(self, sup: _Supervised, returncode: int, now: float) -> None:
        name, p = sup.spec.name, self.policy
        sup.last_exit = Exit(returncode, time.time())
        sup.exited_at = now
        backoff = sup.budget.backoff_after_exit(now)
        if backoff is None:
            sup.state = ProcessState.FAILED
            self._event(f"{name} {sup.last_exit.describe()}: FAILED, {p.max_restarts} "
                        f"restarts in {p.window_s:g} s used up; the rest of the mesh keeps "
                        f"serving. Last lines of {self.log_path(name)}:\n{self.log_tail(name)}")
            return
        sup.state = ProcessState.BACKOFF
        sup.restart_at = now + backoff
        self._event(f"{name} {sup.last_exit.describe()}; restarting in {backoff:g} s "
                    f"(restart {sup.budget.num_recent(now) + 1} of {p.max_restarts} "
                    f"allowed in {p.window_s:g} s)")

    def statuses(self) -> list[ProcessStatus]:
        return [ProcessStatus(r, r.probe()) for r in self.records()]

    def records(self) -> list[ProcessRecord]:
        out = []
        for spec in self.specs:
            sup, proc = self._supervised[spec.name], self.procs.get(spec.name)
            is_up = proc is not None and sup.state not in (
                ProcessState.BACKOFF, ProcessState.FAILED, ProcessState.STOPPED)
            out.append(ProcessRecord(spec.name, proc.pid if is_up and proc else None,
                                     spec.endpoint, spec.probe, sup.state.value,
                                     sup.budget.num_restarts, sup.last_exit))
        return out

    def log_tail(self, name: str, num_lines: int = 15) -> str:
        try:
            lines = self.log_path(name).read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-num_lines:])

    def hurry(self) -> None:
        """Make a stop in progress skip what is left of its graces (a second Ctrl-C)."""
        self._hurry.set()

    def stop(self) -> None:
        """Stop gracefully; returns when every process has exited. Restarts end here.
        The gateway is asked to stop taking new calls (each spec's ``drain_url``), then
        each ``StopStage`` in turn gets SIGTERM and up to its ``stop_timeout_s`` to
        exit before its process group is killed."""
        with self._lock:
            self._is_stopping = True
        for spec in self.specs:
            proc = self.procs.get(spec.name)
            if spec.drain_url and proc is not None and not _has_exited(proc):
                self._drain(spec)
        for stage in sorted({s.stop_stage for s in self.specs}):
            self._stop_together([s for s in self.specs if s.stop_stage == stage])
        for sup in self._supervised.values():
            for copier in sup.copiers:
                copier.join(timeout=2)
        (self.run_dir / STATE_FILE).unlink(missing_ok=True)

    def _drain(self, spec: ProcessSpec) -> None:
        assert spec.drain_url is not None
        request = urllib.request.Request(spec.drain_url, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=DRAIN_TIMEOUT_S):
                self._event(f"{spec.name} stopped taking new calls")
        except (urllib.error.URLError, OSError) as exc:
            self._event(f"{spec.name} did not take the drain request ({exc}); stopping on")

    def _stop_together(self, specs: list[ProcessSpec]) -> None:
        """SIGTERM to each, then wait for all; a process still there after its own
        ``stop_timeout_s`` (or at once after ``hurry()``) is killed with its group."""
        started = time.monotonic()
        pending: dict[str, subprocess.Popen] = {}
        with self._lock:
            for spec in specs:
                proc = self.procs.get(spec.name)
                sup = self._supervised[spec.name]
                if proc is None or proc.returncode is not None:  # down already
                    sup.state = ProcessState.STOPPED
                elif _has_exited(proc):  # exited just now: what it left goes too
                    _reap(proc)
                    sup.state = ProcessState.STOPPED
                else:
                    proc.send_signal(signal.SIGTERM)
                    pending[spec.name] = proc
                    sup.state = ProcessState.STOPPING
            self._write_state()
        timeouts = {s.name: s.stop_timeout_s for s in specs}
        while pending:
            for name, proc in list(pending.items()):
                if _has_exited(proc):
                    _reap(proc)
                elif self._hurry.is_set() or time.monotonic() - started > timeouts[name]:
                    self._event(f"{name} did not stop within {timeouts[name]:g} s: killed")
                    _kill_group(proc)
                    proc.wait(timeout=REAP_TIMEOUT_S)
                else:
                    continue
                del pending[name]
                self._supervised[name].state = ProcessState.STOPPED
            time.sleep(0.05)
        if specs:
            names = ", ".join(s.name for s in specs)
            self._event(f"stopped {names} ({time.monotonic() - started:.1f} s)")

    def _spawn(self, sup: _Supervised) -> None:
        spec = sup.spec
        for old in sup.copiers:  # the last lines of the previous life first
            old.join(timeout=1)
        proc = subprocess.Popen(spec.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=self.env,
                                start_new_session=True)
        self.procs[spec.name] = proc
        assert proc.stdout is not None
        copier = threading.Thread(target=self._copy_log, args=(spec.name, proc.stdout),
                                  name=f"log-{spec.name}", daemon=True)
        copier.start()
        sup.copiers = [copier]
        sup.next_probe_at = 0.0

    def _copy_log(self, name: str, stream: IO[bytes]) -> None:
        with open(self.log_path(name), "ab") as log:
            for raw in iter(stream.readline, b""):
                log.write(raw)
                log.flush()
                if self.sink is not None:
                    self.sink(name, raw.decode(errors="replace").rstrip("\n"))

    def _event(self, line: str) -> None:
        if self.on_event is not None:
            self.on_event(line)

    def _write_state(self) -> None:
        """What ``genmesh status`` reads: every process's state, restarts, last exit."""
        write_state(self.run_dir / STATE_FILE, MeshState(os.getpid(), self.records()))


def _has_exited(proc: subprocess.Popen) -> bool:
    """Whether ``proc`` has exited, without reaping it: while it is an unreaped zombie its
    process id, and so its process group's, cannot be reused, and ``_reap`` can kill
    what it left in its group."""
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped elsewhere (a test's own wait())
        return proc.poll() is not None
    return info is not None


def _reap(proc: subprocess.Popen) -> int:
    """Kill what an exited process left in its group (a worker's engine process, which
    holds its log pipe and its memory), then collect its exit status."""
    _kill_group(proc)
    return proc.wait(timeout=REAP_TIMEOUT_S)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group ``proc`` leads, and ``proc`` itself (in case it was
    started outside a session of its own)."""
    # ProcessLookupError: nothing left; PermissionError: not a group of ours.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
