"""The caller's side of an engine: one asyncio stream of deltas per request.

Both ways of running the engine core (a thread of this process, or a process of its
own) deliver deltas the same way: a step's deltas arrive on a thread that is not the
caller's, grouped by the event loop that owns each stream, and are handed over with one
``call_soon_threadsafe`` per loop and step.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable

from services.worker.engine.outputs import Delta, FinishReason
from services.worker.engine.params import InvalidRequestError

_Sink = tuple[asyncio.Queue[Delta], asyncio.AbstractEventLoop]


class StreamRegistry:
    """Owns the open streams (request id -> sink) and whether new ones may open."""

    def __init__(self) -> None:
        self._sinks: dict[str, _Sink] = {}
        self._lock = threading.Lock()  # the caller's loop vs the delivering thread
        self.is_stopped = False
        self._stop_reason = "the engine is shut down"

    def open(self, request_id: str, send_add: Callable[[], None]) -> asyncio.Queue[Delta]:
        """Register a stream and queue its request (``send_add``) under one lock, so no
        abort or shutdown is ordered between them. Raises RuntimeError once stopped and
        InvalidRequestError for an id already running."""
        sink: asyncio.Queue[Delta] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.is_stopped:
                raise RuntimeError(self._stop_reason)
            if request_id in self._sinks:
                raise InvalidRequestError("request_id", f"{request_id!r} is already running")
            self._sinks[request_id] = (sink, loop)
            send_add()
        return sink

    def close(self, request_id: str, sink: asyncio.Queue[Delta],
              send_abort: Callable[[], None]) -> None:
        """A stream left before its last delta: abort its request, but only if the id
        still belongs to this stream (not to a later request reusing it). Commands are
        ordered, so the abort reaches the core before any later request of that id."""
        with self._lock:
            target = self._sinks.get(request_id)
            if target is not None and target[0] is sink:
                send_abort()

    def stop(self, send_stop: Callable[[], None], *,
             reason: str = "the engine is shut down") -> None:
        """Refuse new streams from now on (``reason`` is the RuntimeError's message)."""
        with self._lock:
            if not self.is_stopped:
                self.is_stopped = True
                self._stop_reason = reason
            send_stop()

    def deliver(self, deltas: Iterable[Delta]) -> None:
        """Hand deltas to their streams; a final delta closes its stream's entry."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Delta], Delta]]] = {}
        with self._lock:
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

    def fail_all(self, error: str) -> None:
        """End every open stream with an ERROR delta (the core is gone)."""
        with self._lock:
            ids = list(self._sinks)
        self.deliver(Delta(rid, [], finish_reason=FinishReason.ERROR, error=error)
                     for rid in ids)


class RequestStream:
    """The deltas of one request: ``async for delta in stream``. The last delta has the
    finish reason and usage. Closing the stream (``aclose``, cancelling the task that
    awaits it, or dropping it) before that aborts the request."""

    def __init__(self, request_id: str, sink: asyncio.Queue[Delta],
                 on_close: Callable[[str, asyncio.Queue[Delta]], None]) -> None:
        self.request_id = request_id
        self._sink = sink
        self._on_close = on_close
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

    def take_ready(self) -> list[Delta]:
        """The deltas already waiting, without waiting (none once the last was read).
        A caller that fell behind sends them as one message instead of one each."""
        ready: list[Delta] = []
        while not self._done:
            try:
                delta = self._sink.get_nowait()
            except asyncio.QueueEmpty:
                break
            ready.append(delta)
            self._done = delta.finished
        return ready

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._on_close(self.request_id, self._sink)

    def __del__(self) -> None:
        self._close()


def _put_all(items: list[tuple[asyncio.Queue[Delta], Delta]]) -> None:
    for sink, delta in items:
        sink.put_nowait(delta)
