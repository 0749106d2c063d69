"""The engine behind an asyncio API: the step loop runs on its own thread.

Callers ``submit`` a prompt and iterate its deltas; ``abort`` (or leaving the
iteration early) frees the request's blocks at the start of the next step. Bad input
raises InvalidRequestError from ``submit`` itself and never reaches the loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from services.worker.engine.config import EngineConfig
from services.worker.engine.core import EngineCore
from services.worker.engine.outputs import Delta, EngineStats
from services.worker.engine.params import InvalidRequestError, Priority, SamplingParams
from services.worker.engine.request import Request

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # how long the idle loop sleeps between checks for shutdown
START_TIMEOUT_S = 900.0  # longest model load we wait for (a dummy 8B on a GPU is minutes)


@dataclass(slots=True)
class _Add:
    request: Request


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _ResetPrefixCache:
    pass


class AsyncEngine:
    """Thread-backed engine; one instance per model version in a worker."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.core: EngineCore
        self._commands: queue.SimpleQueue[_Add | _Abort | _ResetPrefixCache | None] = (
            queue.SimpleQueue()
        )
        self._sinks: dict[str, tuple[asyncio.Queue[Delta], asyncio.AbstractEventLoop]] = {}
        self._ids = itertools.count()
        self._stopped = threading.Event()
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
               cache_salt: str = "") -> AsyncIterator[Delta]:
        """Queue a generation; returns its deltas. Raises InvalidRequestError."""
        if self._stopped.is_set():
            raise RuntimeError("the engine is shut down")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._sinks:
            raise InvalidRequestError("request_id", f"{rid!r} is already running")
        req = self.core.make_request(rid, prompt_ids, params, priority=priority,
                                     cache_salt=cache_salt)
        sink: asyncio.Queue[Delta] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._sinks[rid] = (sink, loop)
        self._commands.put(_Add(req))
        return self._stream(rid, sink)

    async def _stream(self, request_id: str, sink: asyncio.Queue[Delta]) -> AsyncIterator[Delta]:
        finished = False
        try:
            while True:
                delta = await sink.get()
                finished = delta.finished
                yield delta
                if finished:
                    return
        finally:
            if not finished:  # the caller left early (cancel, aclose, error)
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Cancel a request; its final delta (finish_reason ABORT) goes to its stream."""
        self._commands.put(_Abort(request_id))

    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes (e.g. after a weight swap, or between benchmark runs)."""
        self._commands.put(_ResetPrefixCache())

    def stats(self) -> EngineStats:
        """The snapshot taken after the latest step or command."""
        return self._stats

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        self._commands.put(None)
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
        self._run()

    def _run(self) -> None:
        core = self.core
        while not self._stopped.is_set():
            try:
                block = not core.has_work()
                self._drain_commands(block=block)
                if not core.has_work():
                    continue
                deltas = core.step()
            except Exception as exc:  # keep serving: fail what was in flight, go on
                log.exception("engine step failed")
                deltas = core.fail_all(f"engine failure: {exc}")
            self._stats = core.stats()
            self._deliver(deltas)
        self._deliver(core.fail_all("the engine is shutting down"))

    def _drain_commands(self, *, block: bool) -> None:
        deltas = []
        try:
            cmd = self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()
            while True:
                if isinstance(cmd, _Add):
                    self.core.add(cmd.request)
                elif isinstance(cmd, _Abort):
                    delta = self.core.abort(cmd.request_id)
                    if delta is not None:
                        deltas.append(delta)
                elif isinstance(cmd, _ResetPrefixCache):
                    self.core.blocks.reset_prefix_cache()
                cmd = self._commands.get_nowait()
        except queue.Empty:
            pass
        if deltas:
            self._stats = self.core.stats()
            self._deliver(deltas)

    def _deliver(self, deltas: list[Delta]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Delta], Delta]]] = {}
        for d in deltas:
            target = self._sinks.get(d.request_id)
            if target is None:
                continue
            if d.finished:
                del self._sinks[d.request_id]
            by_loop.setdefault(target[1], []).append((target[0], d))
        for loop, items in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue[Delta], Delta]]) -> None:
    for sink, delta in items:
        sink.put_nowait(delta)
