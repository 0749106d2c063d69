"""The asyncio client: the same calls as ``Client``, awaitable."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

import grpc

from genmesh.client import types as t
from genmesh.client.sync import DEFAULT_ADDRESS
from genmesh.v1 import generation_pb2, generation_pb2_grpc

T = TypeVar("T")


class AsyncClient:
    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout_s: float = 300.0,
                 api_key: str | None = None,
                 metadata: tuple[tuple[str, str], ...] = (),
                 credentials: grpc.ChannelCredentials | None = None,
                 options: tuple[tuple[str, Any], ...] = ()) -> None:
        """``api_key`` (else $GENMESH_API_KEY) is sent as ``x-api-key`` on every call.
        ``credentials``: TLS (with ``options``, e.g. a target name override); None:
        plaintext, as the edge of `genmesh up` speaks."""
        self.channel = (grpc.aio.insecure_channel(address, options=options) if credentials is None
                        else grpc.aio.secure_channel(address, credentials, options=options))
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = t.with_api_key(metadata, api_key)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def generate(self, prompt: str | None = None, *,
                       messages: list[dict[str, str]] | None = None, model: str = "",
                       model_version: str = "", request_id: str = "",
                       skip_cache: bool = False, n: int = 0, priority: str = "",
                       **params: Any) -> t.Completion:
        req = t.generate_request(prompt, messages, model=model, model_version=model_version,
                                 request_id=request_id, params=params, skip_cache=skip_cache,
                                 n=n, priority=priority)
        try:
            reply = await self.stub.Generate(req, timeout=self.timeout_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            raise t.GenmeshError.from_rpc(exc) from None
        return t.completion_from_proto(reply)

    async def generate_stream(self, prompt: str | None = None, *,
                              messages: list[dict[str, str]] | None = None, model: str = "",
                              model_version: str = "", request_id: str = "",
                              skip_cache: bool = False, n: int = 0, priority: str = "",
                              **params: Any) -> AsyncIterator[t.Chunk]:
        req = t.generate_request(prompt, messages, model=model, model_version=model_version,
                                 request_id=request_id, params=params, skip_cache=skip_cache,
                                 n=n, priority=priority)
        call = self.stub.GenerateStream(req, timeout=self.timeout_s, metadata=self.metadata)
        async for item in _streamed(call, t.chunk_from_proto):
            yield item

    def chat(self, *, model: str = "", model_version: str = "", system_prompt: str = "",
             **params: Any) -> AsyncChatSession:
        return AsyncChatSession(self, t.start_request(model, model_version, system_prompt,
                                                      params))

    async def generate_batch(self, items: Iterable[t.BatchItem] | AsyncIterable[t.BatchItem],
                             *, model: str = "", model_version: str = ""
                             ) -> AsyncIterator[t.BatchResult]:
        """Results as they finish (in any order), one per item; see ``Client``."""
        async def requests() -> AsyncIterator[generation_pb2.BatchRequest]:
            if isinstance(items, AsyncIterable):
                async for item in items:
                    yield t.batch_request(item, model=model, model_version=model_version)
            else:
                for item in items:
                    yield t.batch_request(item, model=model, model_version=model_version)

        call = self.stub.GenerateBatch(requests(), timeout=self.timeout_s,
                                       metadata=self.metadata)
        async for item in _streamed(call, t.batch_result_from_proto):
            yield item

    async def submit_job(self, prompt: str | None = None, *,
                         messages: list[dict[str, str]] | None = None, job_id: str = "",
                         model: str = "", model_version: str = "", n: int = 0,
                   priority: str = "", **params: Any) -> t.Job:
        req = t.generate_request(prompt, messages, model=model, model_version=model_version,
                                 request_id="", params=params, n=n, priority=priority)
        return await self._job_call(self.stub.SubmitJob, generation_pb2.SubmitJobRequest(
            job_id=job_id, request=req))

    async def get_job(self, job_id: str) -> t.Job:
        return await self._job_call(self.stub.GetJob, generation_pb2.JobRef(job_id=job_id))

    async def cancel_job(self, job_id: str) -> t.Job:
        return await self._job_call(self.stub.CancelJob, generation_pb2.JobRef(job_id=job_id))

    async def watch_job(self, job_id: str) -> AsyncIterator[t.Job]:
        call = self.stub.WatchJob(generation_pb2.JobRef(job_id=job_id), timeout=self.timeout_s,
                                  metadata=self.metadata)
        async for item in _streamed(call, t.job_from_proto):
            yield item

    async def _job_call(self, method: Any, request: Any) -> t.Job:
        try:
            return t.job_from_proto(await method(request, timeout=self.timeout_s,
                                                 metadata=self.metadata))
        except grpc.aio.AioRpcError as exc:
            raise t.GenmeshError.from_rpc(exc) from None

    async def list_models(self) -> list[t.ModelInfo]:
        try:
            reply = await self.stub.ListModels(generation_pb2.ListModelsRequest(),
                                               timeout=self.timeout_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            raise t.GenmeshError.from_rpc(exc) from None
        return t.models_from_proto(reply)



async def _streamed(call: Any, convert: Callable[[Any], T]) -> AsyncIterator[T]:
    """A server stream's replies, converted; an RPC error raises GenmeshError, and
    closing the iterator cancels the call."""
    try:
        async for reply in call:
            yield convert(reply)
    except grpc.aio.AioRpcError as exc:
        raise t.GenmeshError.from_rpc(exc) from None
    finally:
        call.cancel()


class AsyncChatSession:
    """``async with client.chat() as s: async for event in s.turn("Hi"): ...``"""

    def __init__(self, client: AsyncClient, start: generation_pb2.ChatRequest) -> None:
        self._call = client.stub.Chat(timeout=client.timeout_s, metadata=client.metadata)
        self._start = start
        self._is_started = False

    async def __aenter__(self) -> AsyncChatSession:
        await self._write(self._start)
        self._is_started = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start_turn(self, content: str, **params: Any) -> None:
        await self._write(t.turn_request(content, params))

    async def cancel(self) -> None:
        await self._write(t.CANCEL)

    async def next_event(self) -> t.ChatEvent | None:
        """The next event, or None when the session has ended; raises GenmeshError."""
        try:
            reply = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise t.GenmeshError.from_rpc(exc) from None
        if reply is grpc.aio.EOF:
            return None
        return t.chat_event_from_proto(reply)

    async def turn(self, content: str, **params: Any) -> AsyncIterator[t.ChatEvent]:
        await self.start_turn(content, **params)
        tracker = t.TurnTracker()
        while (event := await self.next_event()) is not None:
            is_last = tracker.is_last(event)
            yield event
            if is_last:
                return
        raise t.session_ended_mid_turn()

    async def close(self) -> None:
        try:
            await self._write(t.END)
            await self._call.done_writing()
            while await self.next_event() is not None:
                pass
        except t.GenmeshError:
            pass
        finally:
            self._call.cancel()

    async def _write(self, request: generation_pb2.ChatRequest) -> None:
        try:
            await self._call.write(request)
        except grpc.aio.AioRpcError as exc:
            raise t.GenmeshError.from_rpc(exc) from None
