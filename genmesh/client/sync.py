"""The blocking client: one method per call shape of the public Generation API."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc

from genmesh.client import types as t
from genmesh.v1 import generation_pb2, generation_pb2_grpc

T = TypeVar("T")

DEFAULT_ADDRESS = "127.0.0.1:8080"  # the Envoy edge listener of `genmesh up`


class Client:
    """``Client("127.0.0.1:8080")``; every call takes sampling keyword arguments
    (max_tokens, temperature, top_p, top_k, min_p, seed, stop, ...)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout_s: float = 300.0,
                 api_key: str | None = None,
                 metadata: tuple[tuple[str, str], ...] = (),
                 credentials: grpc.ChannelCredentials | None = None,
                 options: tuple[tuple[str, Any], ...] = ()) -> None:
        """``api_key`` (else $GENMESH_API_KEY) is sent as ``x-api-key`` on every call.
        ``credentials``: TLS (with ``options``, e.g. a target name override); None:
        plaintext, as the edge of `genmesh up` speaks."""
        self.channel = (grpc.insecure_channel(address, options=options) if credentials is None
                        else grpc.secure_channel(address, credentials, options=options))
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = t.with_api_key(metadata, api_key)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
                 model: str = "", model_version: str = "", request_id: str = "",
                 skip_cache: bool = False, n: int = 0, priority: str = "",
                 **params: Any) -> t.Completion:
        """``skip_cache``: always run inference (never a replay from the response cache).
        ``n``: choices to generate (0: one; the Completion's ``choices`` has them);
        ``priority``: "interactive", "normal" or "batch" ("": the call's, normal)."""
        req = t.generate_request(prompt, messages, model=model, model_version=model_version,
                                 request_id=request_id, params=params, skip_cache=skip_cache,
                                 n=n, priority=priority)
        try:
            reply = self.stub.Generate(req, timeout=self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise t.GenmeshError.from_rpc(exc) from None
        return t.completion_from_proto(reply)

    def generate_stream(self, prompt: str | None = None, *,
                        messages: list[dict[str, str]] | None = None, model: str = "",
                        model_version: str = "", request_id: str = "",
                        skip_cache: bool = False, n: int = 0, priority: str = "",
                        **params: Any) -> Iterator[t.Chunk]:
        """Chunks as they are generated; closing the iterator cancels the generation.
        With ``n`` > 1 the choices' chunks interleave, each with its ``index``."""
        req = t.generate_request(prompt, messages, model=model, model_version=model_version,
                                 request_id=request_id, params=params, skip_cache=skip_cache,
                                 n=n, priority=priority)
        call = self.stub.GenerateStream(req, timeout=self.timeout_s, metadata=self.metadata)
        yield from _streamed(call, t.chunk_from_proto)

    def chat(self, *, model: str = "", model_version: str = "", system_prompt: str = "",
             **params: Any) -> ChatSession:
        return ChatSession(self, t.start_request(model, model_version, system_prompt, params))

    def generate_batch(self, items: Iterable[t.BatchItem], *, model: str = "",
                       model_version: str = "") -> Iterator[t.BatchResult]:
        """Results as they finish (in any order), one per item; ``items`` is read lazily,
        as the server has room. Raises GenmeshError when the stream itself fails."""
        requests = (t.batch_request(i, model=model, model_version=model_version) for i in items)
        call = self.stub.GenerateBatch(requests, timeout=self.timeout_s, metadata=self.metadata)
        yield from _streamed(call, t.batch_result_from_proto)

    def submit_job(self, prompt: str | None = None, *,
                   messages: list[dict[str, str]] | None = None, job_id: str = "",
                   model: str = "", model_version: str = "", n: int = 0,
                   priority: str = "", **params: Any) -> t.Job:
        """Queues a job and returns at once; ``job_id`` (yours, optional) makes retries safe."""
        req = t.generate_request(prompt, messages, model=model, model_version=model_version,
                                 request_id="", params=params, n=n, priority=priority)
        return self._job_call(self.stub.SubmitJob,
                              generation_pb2.SubmitJobRequest(job_id=job_id, request=req))

    def get_job(self, job_id: str) -> t.Job:
        return self._job_call(self.stub.GetJob, generation_pb2.JobRef(job_id=job_id))

    def cancel_job(self, job_id: str) -> t.Job:
        return self._job_call(self.stub.CancelJob, generation_pb2.JobRef(job_id=job_id))

    def watch_job(self, job_id: str) -> Iterator[t.Job]:
        """The job now, then every change; the last one has ended."""
        call = self.stub.WatchJob(generation_pb2.JobRef(job_id=job_id), timeout=self.timeout_s,
                                  metadata=self.metadata)
        yield from _streamed(call, t.job_from_proto)

    def _job_call(self, method: Any, request: Any) -> t.Job:
        try:
            return t.job_from_proto(method(request, timeout=self.timeout_s,
                                           metadata=self.metadata))
        except grpc.RpcError as exc:
            raise t.GenmeshError.from_rpc(exc) from None

    def list_models(self) -> list[t.ModelInfo]:
        try:
            reply = self.stub.ListModels(generation_pb2.ListModelsRequest(),
                                         timeout=self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise t.GenmeshError.from_rpc(exc) from None
        return t.models_from_proto(reply)


_CLOSED = object()


class ChatSession:
    """A bidirectional Chat: ``for event in session.turn("Hi"): ...``. A reader thread
    moves the server's events into a queue, so waits have timeouts and a Ctrl-C in the
    caller never breaks the stream (``cancel()`` then ends the turn)."""

    def __init__(self, client: Client, start: generation_pb2.ChatRequest) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._requests.put(start)
        self._events: queue.Queue = queue.Queue()
        self._call = client.stub.Chat(iter(self._requests.get, _CLOSED),
                                      timeout=client.timeout_s, metadata=client.metadata)
        self._timeout_s = client.timeout_s
        self._reader = threading.Thread(target=self._read, daemon=True, name="chat-reader")
        self._reader.start()

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_turn(self, content: str, **params: Any) -> None:
        self._requests.put(t.turn_request(content, params))

    def cancel(self) -> None:
        """Cancels the running turn; it ends with a TurnFinished of reason "abort"."""
        self._requests.put(t.CANCEL)

    def next_event(self, timeout_s: float | None = None) -> t.ChatEvent | None:
        """The next event, or None when the session has ended. Raises GenmeshError when
        the stream failed and TimeoutError when nothing arrived in time."""
        try:
            item = self._events.get(timeout=timeout_s or self._timeout_s)
        except queue.Empty:
            raise TimeoutError("no chat event within the timeout") from None
        if isinstance(item, t.GenmeshError):
            self._events.put(item)  # every later read fails the same way
            raise item
        if item is _CLOSED:
            self._events.put(item)
            return None
        return item  # type: ignore[no-any-return]

    def turn(self, content: str, **params: Any) -> Iterator[t.ChatEvent]:
        """Sends a turn and yields its events up to TurnFinished; a rejected or failed
        turn raises GenmeshError."""
        self.start_turn(content, **params)
        tracker = t.TurnTracker()
        while (event := self.next_event()) is not None:
            is_last = tracker.is_last(event)
            yield event
            if is_last:
                return
        raise t.session_ended_mid_turn()

    def close(self) -> None:
        """Ends the session (a running turn is cancelled) and waits for the stream to end."""
        self._requests.put(t.END)
        self._requests.put(_CLOSED)
        self._reader.join(timeout=10)
        self._call.cancel()

    def _read(self) -> None:
        try:
            for event in self._call:
                self._events.put(t.chat_event_from_proto(event))
            self._events.put(_CLOSED)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                self._events.put(_CLOSED)
            else:
                self._events.put(t.GenmeshError.from_rpc(exc))


def _streamed(call: Any, convert: Callable[[Any], T]) -> Iterator[T]:
    """A server stream's replies, converted; an RPC error raises GenmeshError, and
    closing the iterator cancels the call."""
    try:
        for reply in call:
            yield convert(reply)
    except grpc.RpcError as exc:
        raise t.GenmeshError.from_rpc(exc) from None
    finally:
        call.cancel()
