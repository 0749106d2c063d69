"""The engine core in a process of its own, behind the same asyncio API as AsyncEngine.

Why: in one process the step loop and the worker's gRPC event loop share one GIL, so
every millisecond of Python the serving side spends (protobuf, HTTP/2 framing, tracing)
delays a step, and the step's Python delays the replies. Here the core runs alone in a
child process (as vLLM v1's EngineCore does); the worker process only serves.

The two talk over one duplex pipe (``multiprocessing.Pipe``, pickled messages):
parent -> child the loop's commands (``loop.Add`` with a request already validated
here, ``Abort``, ``ResetPrefixCache``, ``Stop``); child -> parent one message per step:
(deltas, stats). A writer thread sends commands, so a long prompt never blocks the
event loop on a full pipe; a reader thread receives steps and hands them to the
streams. If the child dies, every open stream ends with an ERROR delta and new
submissions are refused (the worker then reports UNAVAILABLE).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from services.worker.engine.config import EngineConfig
from services.worker.engine.loop import (
    Command,
    LoopClient,
    NoCommand,
    Stop,
    run_loop,
)
from services.worker.engine.outputs import Delta, EngineStats
from services.worker.engine.params import Priority, SamplingParams
from services.worker.engine.request import new_request
from services.worker.engine.streams import RequestStream, StreamRegistry

log = logging.getLogger(__name__)

START_TIMEOUT_S = 900.0  # longest model load we wait for (a dummy 8B on a GPU is minutes)
STOP_TIMEOUT_S = 10.0  # how long shutdown waits for the child before killing it
# On a CPU the core's threads take every core the machine has; the serving path (this
# worker's gRPC loop, Envoy, the frontend, tokenizer and safety) needs little CPU but
# needs it at once. Niced, the core yields to them when they run and takes what is left
# (all of it, when they are idle).
CPU_NICENESS = 5


class EngineProcessError(RuntimeError):
    """The engine process failed to start, or exited while serving."""


class ProcessEngine(LoopClient):
    """The engine core in a child process; one instance per model version in a worker."""

    def __init__(self, config: EngineConfig, *,
                 on_exit: Callable[[str], None] | None = None) -> None:
        """``on_exit(reason)``: called on the reader thread if the child exits while
        serving (not after ``shutdown``)."""
        self.config = config
        self._on_exit = on_exit
        ctx = multiprocessing.get_context("spawn")  # no forked torch or gRPC state
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._process = ctx.Process(target=_child_main, args=(config, child_conn),
                                    name="genmesh-engine-core", daemon=True)
        self._process.start()
        child_conn.close()  # the child holds its end; EOF here then means it exited
        ready = self._wait_ready()
        self.max_model_len: int = ready["max_model_len"]
        self.vocab_size: int = ready["vocab_size"]
        self._stats: EngineStats = ready["stats"]
        self._streams = StreamRegistry()
        self._commands: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_commands, name="engine-writer",
                                        daemon=True)
        self._reader = threading.Thread(target=self._read_steps, name="engine-reader",
                                        daemon=True)
        self._writer.start()
        self._reader.start()

    def _wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._conn.poll(1.0):
            if not self._process.is_alive():
                raise EngineProcessError(
                    f"the engine process exited with code {self._process.exitcode} "
                    "while starting")
            if time.monotonic() > deadline:
                self._process.kill()
                raise TimeoutError(f"the engine did not start within {START_TIMEOUT_S:.0f} s")
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            raise EngineProcessError("the engine process exited while starting") from None
        if kind == "error":
            self._process.join(STOP_TIMEOUT_S)
            raise EngineProcessError(f"the engine failed to start: {payload}")
        return payload  # type: ignore[no-any-return]

    # -- caller side (asyncio) -------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, *,
               request_id: str | None = None, priority: Priority = Priority.NORMAL,
               cache_salt: str = "") -> RequestStream:
        """Queue a generation; returns its deltas. Raises InvalidRequestError."""
        rid = request_id or f"req-{uuid.uuid4().hex}"
        req = new_request(rid, prompt_ids, params, vocab_size=self.vocab_size,
                          max_model_len=self.max_model_len, priority=priority,
                          cache_salt=cache_salt, arrival_time=time.monotonic())
        return self._open(req)

    def stats(self) -> EngineStats:
        """The snapshot the child sent after its latest step."""
        return self._stats

    def shutdown(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the child; every stream still open ends with an ERROR delta."""
        self._streams.stop(lambda: self._commands.put(Stop()))
        self._reader.join(timeout)  # the child's last message, then EOF
        self._process.join(timeout)
        if self._process.is_alive():
            log.error("the engine process did not stop in time; killing it")
            self._process.kill()
            self._process.join(timeout)
        self._commands.put(None)  # ends the writer
        self._conn.close()

    # -- pipe threads ------------------------------------------------------------------

    def _write_commands(self) -> None:
        while (cmd := self._commands.get()) is not None:
            try:
                self._conn.send(cmd)
            except (OSError, ValueError):  # the child is gone; the reader reports it
                return

    def _read_steps(self) -> None:
        while True:
            try:
                deltas, stats = self._conn.recv()
            except (EOFError, OSError):
                break
            self._stats = stats
            self._streams.deliver(deltas)
        self._process.join(STOP_TIMEOUT_S)
        reason = f"the engine process exited (code {self._process.exitcode})"
        is_unexpected = not self._streams.is_stopped
        self._streams.stop(lambda: None, reason=reason)
        self._streams.fail_all(reason)
        if is_unexpected:
            log.error("the engine process exited while serving",
                      extra={"exitcode": self._process.exitcode})
            if self._on_exit is not None:
                self._on_exit(reason)


def _child_main(config: EngineConfig, conn: Connection) -> None:
    """The child: build the core, report ready, run the loop until Stop or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when to stop
    if config.device == "cpu":
        os.nice(CPU_NICENESS)
    from services.worker.engine.core import EngineCore

    try:
        core = EngineCore(config)
    except BaseException as exc:  # reported to the parent's constructor
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", {"max_model_len": core.max_model_len,
                         "vocab_size": core.model_cfg.vocab_size, "stats": core.stats()}))

    def next_command(timeout_s: float) -> Command:
        if not conn.poll(timeout_s):
            raise NoCommand
        try:
            return conn.recv()  # type: ignore[no-any-return]
        except (EOFError, OSError):  # the worker is gone
            return Stop()

    def publish(deltas: list[Delta], stats: EngineStats) -> None:
        try:
            conn.send((deltas, stats))
        except (OSError, ValueError):  # the worker is gone: nobody to serve
            os._exit(0)

    run_loop(core, next_command, publish)
    conn.close()
