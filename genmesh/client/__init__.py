"""The genmesh client SDK: ``Client`` (blocking) and ``AsyncClient`` (asyncio) for every
call shape of the public API: unary, server streaming, bidirectional Chat, ListModels.

    from genmesh.client import Client
    with Client("127.0.0.1:8080") as client:
        for chunk in client.generate_stream("Once upon a time", max_tokens=32):
            print(chunk.text, end="", flush=True)
"""

from genmesh.client.aio import AsyncChatSession, AsyncClient
from genmesh.client.sync import ChatSession, Client
from genmesh.client.types import (
    BatchItem,
    BatchResult,
    ChatError,
    ChatEvent,
    Choice,
    Chunk,
    Completion,
    GenmeshError,
    Job,
    ModelInfo,
    TextDelta,
    TokenLogprob,
    TopLogprob,
    TurnFinished,
    TurnStarted,
    Usage,
)

__all__ = ["AsyncChatSession", "AsyncClient", "BatchItem", "BatchResult", "ChatError",
           "ChatEvent", "ChatSession", "Choice", "Chunk", "Client", "Completion",
           "GenmeshError", "Job", "ModelInfo", "TextDelta", "TokenLogprob", "TopLogprob",
           "TurnFinished", "TurnStarted", "Usage"]
