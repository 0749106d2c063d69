"""The engine core's loop, wherever it runs: apply the queued commands, step while there
is work, publish each step's deltas with a fresh stats snapshot.

The loop is the same on a thread of the worker (``AsyncEngine``) and in a process of
its own (``ProcessEngine``); only where commands come from and deltas go differ.
"""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.worker.engine.core import EngineCore
from services.worker.engine.outputs import Delta, EngineStats, FinishReason
from services.worker.engine.request import Request
from services.worker.engine.streams import RequestStream, StreamRegistry

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # how long an idle loop waits for a command before looking again


@dataclass(slots=True)
class Add:
    request: Request  # validated by the caller (core.make_request or new_request)


@dataclass(slots=True)
class Abort:
    request_id: str  # the caller checked that the id still belongs to the closing stream


@dataclass(slots=True)
class ResetPrefixCache:
    pass


@dataclass(slots=True)
class Stop:
    pass


Command = Add | Abort | ResetPrefixCache | Stop


class NoCommand(Exception):
    """The command source had nothing within the wait."""


# ``next_command(timeout_s)``: the next command, waiting up to ``timeout_s`` (0: don't
# wait); raises NoCommand when there is none.
NextCommand = Callable[[float], Command]
# ``publish(deltas, stats)``: hand a step's deltas and the stats after it to the callers;
# must not raise.
Publish = Callable[[list[Delta], EngineStats], None]


def run_loop(core: EngineCore, next_command: NextCommand, publish: Publish) -> None:
    """Serve until a Stop command (or the command source reports Stop, e.g. its caller
    is gone); then every request still known ends with an ERROR delta."""
    while True:
        deltas: list[Delta] = []
        try:
            if _apply_commands(core, next_command, deltas, wait=not core.has_work()):
                break
            if core.has_work():
                deltas += core.step()
        except Exception as exc:  # keep serving: fail what was in flight, go on
            log.exception("engine step failed")
            deltas += core.fail_all(f"engine failure: {exc}")
        publish(deltas, core.stats())
    publish(core.fail_all("the engine is shutting down"), core.stats())


def _apply_commands(core: EngineCore, next_command: NextCommand, deltas: list[Delta], *,
                    wait: bool) -> bool:
    """Apply every queued command (waiting for the first one when ``wait``); True on Stop.
    Commands queued behind a Stop are applied first, so their requests end with the
    shutdown's ERROR delta instead of never."""
    timeout = IDLE_WAIT_S if wait else 0.0
    is_stopping = False
    while True:
        try:
            cmd = next_command(timeout)
        except NoCommand:
            return is_stopping
        timeout = 0.0
        if isinstance(cmd, Stop):
            is_stopping = True
            continue
        try:
            delta = _apply(core, cmd)
        except Exception as exc:  # one bad command fails only its own request
            log.exception("engine command failed")
            delta = _error_delta(cmd, exc)
        if delta is not None:
            deltas.append(delta)


def _apply(core: EngineCore, cmd: Command) -> Delta | None:
    if isinstance(cmd, Add):
        core.add(cmd.request)
    elif isinstance(cmd, Abort):
        return core.abort(cmd.request_id)
    elif isinstance(cmd, ResetPrefixCache):
        core.blocks.reset_prefix_cache()
    return None


def _error_delta(cmd: Command, exc: Exception) -> Delta | None:
    if isinstance(cmd, Add):
        return Delta(cmd.request.request_id, [], finish_reason=FinishReason.ERROR,
                     error=f"engine failure: {exc}")
    return None


class LoopClient:
    """The caller's side both ways of running the loop share: the open streams, and the
    commands, which reach the loop in order through ``_commands``."""

    _streams: StreamRegistry
    _commands: queue.SimpleQueue[Any]  # Command (and, for a process's writer, None)

    def _open(self, req: Request) -> RequestStream:
        """Register the request's stream and queue it (one lock: see StreamRegistry)."""
        sink = self._streams.open(req.request_id, lambda: self._commands.put(Add(req)))
        return RequestStream(req.request_id, sink, self._close_stream)

    def abort(self, request_id: str) -> None:
        """Cancel a request; its final delta (finish_reason ABORT) goes to its stream.
        Unknown ids are ignored."""
        self._commands.put(Abort(request_id))

    def _close_stream(self, request_id: str, sink: asyncio.Queue[Delta]) -> None:
        self._streams.close(request_id, sink, lambda: self._commands.put(Abort(request_id)))

    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes. Meant for an idle engine (benchmarks, tests): blocks of
        requests still running are registered again as they fill."""
        self._commands.put(ResetPrefixCache())
