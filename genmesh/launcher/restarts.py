"""When `genmesh up` restarts a process that exited, and when it gives up on it.

A process that exits while the mesh serves is restarted after a backoff: 0.1 s for the
first restart inside the window (a lone crash is most often a one-off, and every moment of
the wait is an outage of what the process serves), then one that doubles with every
further restart (0.5 s, 1 s, 2 s, 4 s with the defaults, up to ``max_backoff_s``), at most
``max_restarts`` times per ``window_s``. One more exit inside the window and the
process is FAILED: left down, reported by ``genmesh status``, while the rest of the mesh
keeps serving (Envoy's health checks have taken it out of rotation). A process that stays
up longer than the window starts again from the shortest backoff.

Pure bookkeeping over a caller's clock (seconds, monotonic): no processes, no sleeping.
"""

from __future__ import annotations

import enum
import signal
from collections import deque
from dataclasses import dataclass


class ProcessState(enum.StrEnum):
    """A supervised process's state, as the state file and ``genmesh status`` show it."""

    STARTING = "STARTING"  # (re)started, not yet answering its probe
    RUNNING = "RUNNING"  # answered its probe once since it started
    BACKOFF = "BACKOFF"  # exited; restarts when its backoff ends
    FAILED = "FAILED"  # exited more often than the restart budget allows; left down
    STOPPING = "STOPPING"  # the mesh is stopping: signalled, not yet exited
    STOPPED = "STOPPED"  # exited while the mesh stops (no restart)


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    first_backoff_s: float = 0.1  # before the first restart in a window
    initial_backoff_s: float = 0.5  # before the second; doubled for each one after
    max_backoff_s: float = 8.0  # the doubling stops here
    max_restarts: int = 5  # restarts allowed per window; one more exit: FAILED
    window_s: float = 60.0  # restarts older than this no longer count


@dataclass(frozen=True, slots=True)
class Exit:
    """How and when a process ended."""

    returncode: int  # as subprocess reports it: the exit status, or -N for signal N
    at: float  # Unix time (seconds) it was seen to exit

    @property
    def signal_name(self) -> str | None:
        """``SIGKILL`` for a process killed by signal 9; None for a normal exit."""
        if self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"

    def describe(self) -> str:
        """``killed by SIGKILL`` or ``exit status 3``."""
        name = self.signal_name
        return f"killed by {name}" if name else f"exit status {self.returncode}"


class RestartBudget:
    """The restarts of one process: what it has used of its window, and its next backoff."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.num_restarts = 0  # over the process's whole life in this mesh
        self._restart_times: deque[float] = deque()  # inside the window, oldest first

    def num_recent(self, now: float) -> int:
        """Restarts within the window that ends at ``now``."""
        while self._restart_times and self._restart_times[0] <= now - self.policy.window_s:
            self._restart_times.popleft()
        return len(self._restart_times)

    def backoff_after_exit(self, now: float) -> float | None:
        """Seconds to wait before restarting a process that exited at ``now``; None when
        the window's budget is spent (the process is then FAILED)."""
        num_recent = self.num_recent(now)
        if num_recent >= self.policy.max_restarts:
            return None
        p = self.policy
        if num_recent == 0:
            return float(min(p.first_backoff_s, p.max_backoff_s))
        return float(min(p.initial_backoff_s * 2 ** (num_recent - 1), p.max_backoff_s))

    def record_restart(self, now: float) -> None:
        self._restart_times.append(now)
        self.num_restarts += 1
