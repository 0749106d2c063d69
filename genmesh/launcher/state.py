"""The state file of a running `genmesh up` (``<run dir>/mesh.json``): what the supervisor
knows of each process, rewritten (atomically) on every change, read by ``genmesh status``.
"""

from __future__ import annotations

import json
import os
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

from genmesh.launcher.probes import EnvoyReady, GrpcHealth, HttpReady, Probe, RedisPing
from genmesh.launcher.restarts import Exit

STATE_FILE = "mesh.json"

_PROBES: dict[str, type] = {p.__name__: p for p in (GrpcHealth, HttpReady, EnvoyReady,
                                                    RedisPing)}


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    name: str
    pid: int | None  # None while it is down (backoff, failed)
    endpoint: str  # what the status table shows
    probe: Probe  # how `genmesh status` asks whether it serves
    state: str | None = None  # a ProcessState; None in a state file without one
    num_restarts: int = 0
    last_exit: Exit | None = None  # its latest exit, None if it never exited


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    """A process as the status table shows it: its record and what its probe says now."""

    record: ProcessRecord
    is_serving: bool

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def pid(self) -> int | None:
        return self.record.pid


@dataclass(frozen=True, slots=True)
class MeshState:
    supervisor_pid: int | None  # the `genmesh up` that writes the file
    processes: list[ProcessRecord]


def write_state(path: Path, state: MeshState) -> None:
    """Replace ``path`` at once (write a temporary file, rename it), so a reader never
    sees half a file."""
    doc = {"supervisor_pid": state.supervisor_pid,
           "processes": [_to_json(r) for r in state.processes]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def read_state(path: Path) -> MeshState:
    """Raises OSError when there is no file, ValueError when it cannot be parsed."""
    try:
        doc = json.loads(path.read_text())
        return MeshState(doc.get("supervisor_pid"),
                         [_from_json(p) for p in doc["processes"]])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a genmesh state file ({exc})") from None


def _to_json(r: ProcessRecord) -> dict[str, Any]:
    last_exit = (None if r.last_exit is None
                 else {"returncode": r.last_exit.returncode, "at": r.last_exit.at,
                       "description": r.last_exit.describe()})
    return {"name": r.name, "pid": r.pid, "endpoint": r.endpoint,
            "probe": type(r.probe).__name__, "probe_args": list(astuple(r.probe)),
            "state": r.state, "num_restarts": r.num_restarts, "last_exit": last_exit}


def _from_json(p: dict[str, Any]) -> ProcessRecord:
    probe: Probe = _PROBES[p["probe"]](*p["probe_args"])
    last = p.get("last_exit")
    last_exit = None if last is None else Exit(int(last["returncode"]), float(last["at"]))
    return ProcessRecord(p["name"], p.get("pid"), p["endpoint"], probe, p.get("state"),
                         int(p.get("num_restarts", 0)), last_exit)
