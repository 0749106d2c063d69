"""The engine behind an asyncio API: the step loop runs on its own thread.

Callers ``submit`` a prompt and iterate its deltas; ``abort`` (or closing the stream
early) frees the request's blocks at the start of the next step. Bad input
raises InvalidRequestError from ``submit`` itself and never reaches the loop.
``ProcessEngine`` (process_engine.py) offers the same API with the loop in a process
of its own.
"""

from __future__ import annotations

import queue
import threading
import uuid

from services.worker.engine.config import EngineConfig
from services.worker.engine.core import EngineCore
from services.worker.engine.loop import (
    Command,
    LoopClient,
    NoCommand,
    Stop,
    run_loop,
)
from services.worker.engine.outputs import Delta, EngineStats
from services.worker.engine.params import Priority, SamplingParams
from services.worker.engine.streams import RequestStream, StreamRegistry

START_TIMEOUT_S = 900.0  # longest model load we wait for (a dummy 8B on a GPU is minutes)


class AsyncEngine(LoopClient):
    """Thread-backed engine; one instance per model version in a worker."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.core: EngineCore
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._streams = StreamRegistry()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        # The engine is built on its own thread, and every torch op runs there: the CPU
        # thread pool then belongs to one thread only (measured: a model loaded on the
        # main thread and run on another decodes ~30% slower).
        self._thread = threading.Thread(target=self._main, name="engine-loop", daemon=True)
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_S):
            raise TimeoutError(f"the engine did not start within {START_TIMEOUT_S:.0f} s")
        if self._start_error is not None:
            raise self._start_error
        self._stats = self.core.stats()

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.core.model_cfg.vocab_size

    # -- caller side (asyncio) -------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, *,
               request_id: str | None = None, priority: Priority = Priority.NORMAL,
               cache_salt: str = "") -> RequestStream:
        """Queue a generation; returns its deltas. Raises InvalidRequestError."""
        rid = request_id or f"req-{uuid.uuid4().hex}"
        req = self.core.make_request(rid, prompt_ids, params, priority=priority,
                                     cache_salt=cache_salt)
        return self._open(req)

    def stats(self) -> EngineStats:
        """The snapshot taken after the latest step or command."""
        return self._stats

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the loop; every stream still open ends with an ERROR delta."""
        self._streams.stop(lambda: self._commands.put(Stop()))
        self._thread.join(timeout)

    # -- engine thread ---------------------------------------------------------------

    def _main(self) -> None:
        try:
            self.core = EngineCore(self.config)
        except BaseException as exc:  # reported to the constructor's caller
            self._start_error = exc
            return
        finally:
            self._started.set()
        run_loop(self.core, self._next_command, self._publish)

    def _next_command(self, timeout_s: float) -> Command:
        try:
            return (self._commands.get(timeout=timeout_s) if timeout_s > 0
                    else self._commands.get_nowait())
        except queue.Empty:
            raise NoCommand from None

    def _publish(self, deltas: list[Delta], stats: EngineStats) -> None:
        self._stats = stats
        self._streams.deliver(deltas)
