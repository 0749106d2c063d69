"""The engine behind an asyncio API: the step loop runs on its own thread.

Callers ``submit`` a prompt and iterate its deltas; ``abort`` (or closing the stream
early) frees the request's blocks at the start of the next step. Bad input
raises InvalidRequestError from ``submit`` itself and never reaches the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import uuid
from dataclasses import dataclass

from services.worker.engine.config import EngineConfig
from services.worker.engine.core import EngineCore
from services.worker.engine.outputs import Delta, EngineStats, FinishReason
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
    sink: asyncio.Queue[Delta] | None  # None: whatever runs under the id; else that stream

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
        self._lock = threading.Lock()
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
               cache_salt: str = "") -> RequestStream:
        """Queue a generation; returns its deltas. Raises InvalidRequestError."""
        rid = request_id or f"req-{uuid.uuid4().hex}"
        req = self.core.make_request(rid, prompt_ids, params, priority=priority,
                                     cache_salt=cache_salt)
        sink: asyncio.Queue[Delta] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        with self._lock:  # against shutdown and a concurrent submit of the same id
            if self._stopped.is_set():
                raise RuntimeError("the engine is shut down")
            if rid in self._sinks:
                raise InvalidRequestError("request_id", f"{rid!r} is already running")
            self._sinks[rid] = (sink, loop)
            self._commands.put(_Add(req))
        return RequestStream(self, rid, sink)

    def abort(self, request_id: str) -> None:
        """Cancel a request; its final delta (finish_reason ABORT) goes to its stream.
        Unknown ids are ignored."""
        self._commands.put(_Abort(request_id, None))

    def _abort_stream(self, request_id: str, sink: asyncio.Queue[Delta]) -> None:
        # Aborts only the request this stream belongs to, not a later one that reuses
        # the id after this one finished.
        self._commands.put(_Abort(request_id, sink))

    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes. Meant for an idle engine (benchmarks, tests): blocks of
        requests still running are registered again as they fill."""
        self._commands.put(_ResetPrefixCache())

    def stats(self) -> EngineStats:
        """The snapshot taken after the latest step or command."""
        return self._stats

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the loop; every stream still open ends with an ERROR delta."""
        with self._lock:
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
            deltas: list[Delta] = []
            try:
                self._drain_commands(block=not core.has_work())
                if core.has_work():
                    deltas = core.step()
            except Exception as exc:  # keep serving: fail what was in flight, go on
                log.exception("engine step failed")
                deltas = core.fail_all(f"engine failure: {exc}")
            self._publish(deltas)
        # Commands queued before the stop was seen: their requests never ran.
        self._drain_commands(block=False)
        self._publish(core.fail_all("the engine is shutting down"))

    def _drain_commands(self, *, block: bool) -> None:
        deltas: list[Delta] = []
        try:
            cmd = self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()
            while True:
                try:
                    delta = self._apply(cmd)
                except Exception as exc:  # one bad command fails only its own request
                    log.exception("engine command failed")
                    delta = _error_delta(cmd, exc)
                if delta is not None:
                    deltas.append(delta)
                cmd = self._commands.get_nowait()
        except queue.Empty:
            pass
        finally:
            if deltas:
                self._publish(deltas)

    def _apply(self, cmd: _Add | _Abort | _ResetPrefixCache | None) -> Delta | None:
        if isinstance(cmd, _Add):
            self.core.add(cmd.request)
        elif isinstance(cmd, _Abort):
            target = self._sinks.get(cmd.request_id)
            if cmd.sink is None or (target is not None and target[0] is cmd.sink):
                return self.core.abort(cmd.request_id)
        elif isinstance(cmd, _ResetPrefixCache):
            self.core.blocks.reset_prefix_cache()
        return None

    def _publish(self, deltas: list[Delta]) -> None:
        """Refresh the stats snapshot and hand deltas to their streams; never raises."""
        try:
            self._stats = self.core.stats()
            self._deliver(deltas)
        except Exception:
            log.exception("delivering engine output failed")

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
            with contextlib.suppress(RuntimeError):  # the caller's loop closed meanwhile
                loop.call_soon_threadsafe(_put_all, items)


class RequestStream:
    """The deltas of one request: ``async for delta in stream``. The last delta has the
    finish reason and usage. Closing the stream (``aclose``, cancelling the task that
    awaits it, or dropping it) before that aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str,
                 sink: asyncio.Queue[Delta]) -> None:
        self.request_id = request_id
        self._engine = engine
        self._sink = sink
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Delta:
        if self._done:
            raise StopAsyncIteration
        try:
            delta = await self._sink.get()
        except BaseException:  # cancelled while waiting: the caller is gone
            self._close()
            raise
        self._done = delta.finished
        return delta

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._engine._abort_stream(self.request_id, self._sink)

    def __del__(self) -> None:
        self._close()


def _error_delta(cmd: object, exc: Exception) -> Delta | None:
    if isinstance(cmd, _Add):
        return Delta(cmd.request.request_id, [], finish_reason=FinishReason.ERROR,
                     error=f"engine failure: {exc}")
    return None


def _put_all(items: list[tuple[asyncio.Queue[Delta], Delta]]) -> None:
    for sink, delta in items:
        sink.put_nowait(delta)
