"""Runs the planned processes: start, wait for health, copy their logs, stop cleanly.

Children run in their own sessions, so a Ctrl-C reaches only the supervisor, which then
stops them in reverse start order (SIGTERM, a grace period, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import IO

from genmesh.launcher.plan import ProcessSpec

LogSink = Callable[[str, str], None]  # (process name, one line of its output)

STATE_FILE = "mesh.json"


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
    """A process exited while the mesh was starting or running."""


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    name: str
    pid: int | None
    endpoint: str
    is_serving: bool


class Supervisor:
    def __init__(self, specs: list[ProcessSpec], *, run_dir: Path,
                 sink: LogSink | None = None, env: dict[str, str] | None = None) -> None:
        self.specs = specs
        self.run_dir = run_dir
        self.sink = sink
        self.env = {**os.environ, **(env or {})}
        self.procs: dict[str, subprocess.Popen] = {}
        self._copiers: list[threading.Thread] = []

    def log_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for spec in self.specs:
            proc = subprocess.Popen(spec.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self.env,
                                    start_new_session=True)
            self.procs[spec.name] = proc
            assert proc.stdout is not None
            copier = threading.Thread(target=self._copy_log, args=(spec.name, proc.stdout),
                                      name=f"log-{spec.name}", daemon=True)
            copier.start()
            self._copiers.append(copier)
        self._write_state()

    def wait_ready(self, timeout_s: float) -> None:
        """Returns when every process is serving; raises ProcessFailedError (a process
        exited, with the tail of its log) or TimeoutError (naming who is not ready)."""
        deadline = time.monotonic() + timeout_s
        pending = list(self.specs)
        while pending:
            self.check_alive()
            pending = [s for s in pending if not s.probe()]
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                raise TimeoutError(f"not serving after {timeout_s:.0f} s: {names} "
                                   f"(logs in {self.run_dir})")
            time.sleep(0.2)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise ProcessFailedError(
                    f"{name} exited with status {proc.returncode}; last lines of "
                    f"{self.log_path(name)}:\n{self.log_tail(name)}")

    def statuses(self) -> list[ProcessStatus]:
        return [ProcessStatus(s.name, self.procs[s.name].pid if s.name in self.procs else None,
                              s.endpoint, s.probe()) for s in self.specs]

    def log_tail(self, name: str, num_lines: int = 15) -> str:
        try:
            lines = self.log_path(name).read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-num_lines:])

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM in reverse start order, so the edge closes before what it calls."""
        for spec in reversed(self.specs):
            proc = self.procs.get(spec.name)
            if proc is not None:
                terminate(proc, grace_s=grace_s)
        for copier in self._copiers:
            copier.join(timeout=2)
        (self.run_dir / STATE_FILE).unlink(missing_ok=True)

    def _copy_log(self, name: str, stream: IO[bytes]) -> None:
        with open(self.log_path(name), "ab") as log:
            for raw in iter(stream.readline, b""):
                log.write(raw)
                log.flush()
                if self.sink is not None:
                    self.sink(name, raw.decode(errors="replace").rstrip("\n"))

    def _write_state(self) -> None:
        """What ``genmesh status`` reads to find this mesh's processes."""
        state = [{"name": s.name, "pid": self.procs[s.name].pid, "endpoint": s.endpoint,
                  "probe": type(s.probe).__name__, "probe_args": list(astuple(s.probe))}
                 for s in self.specs]
        (self.run_dir / STATE_FILE).write_text(json.dumps({"processes": state}, indent=1))

