"""The interface every inference engine of a worker offers, and the factory that picks one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol

from services.worker.engine.config import Backend, EngineConfig
from services.worker.engine.outputs import Delta, EngineStats
from services.worker.engine.params import Priority, SamplingParams


class Engine(Protocol):
    """What the worker servicer calls; the native engine and TensorRT-LLM both offer it."""

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def submit(self, prompt_ids: list[int], params: SamplingParams, *,
               request_id: str | None = None, priority: Priority = Priority.NORMAL,
               cache_salt: str = "") -> AsyncIterator[Delta]:
        """Queue a generation and return its stream of deltas; the last one carries the
        finish reason and usage. Raises InvalidRequestError (naming the field) for bad
        input, before anything is queued. Must be called from a running event loop."""
        ...

    def abort(self, request_id: str) -> None:
        """Cancel a request; its stream ends with finish_reason ABORT. Unknown ids are
        ignored."""
        ...

    def stats(self) -> EngineStats: ...

    def shutdown(self, timeout: float = 5.0) -> None: ...


def create_engine(config: EngineConfig, *, core_process: bool = False,
                  on_core_exit: Callable[[str], None] | None = None) -> Engine:
    """Build the engine ``config.backend`` names; heavy imports happen only here.
    ``core_process``: the native engine's core runs in a child process (ProcessEngine)
    instead of a thread of this one (AsyncEngine); ``on_core_exit(reason)`` is called
    (from another thread) if that process exits while serving."""
    if config.backend is Backend.TENSORRT_LLM:
        from services.worker.engine.trtllm_engine import TrtLlmEngine

        return TrtLlmEngine(config)
    if core_process:
        from services.worker.engine.process_engine import ProcessEngine

        return ProcessEngine(config, on_exit=on_core_exit)
    from services.worker.engine.async_engine import AsyncEngine

    return AsyncEngine(config)
