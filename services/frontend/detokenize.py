"""Detokenization of a generation's token ids, chosen once at start-up.

In-process (the default where the frontend sees the model store): the frontend loads the
served model's ``tokenizer.json``, the same file the tokenizer service loads, and steps
the shared ``IncrementalDetokenizer`` (a few microseconds a token, no round trip). Remote:
one Detokenize stream to the tokenizer service per generation, one round trip per worker
message, for deployments whose frontend cannot see the model store.

Both give the same text for the same ids (tests/services/frontend/test_detokenize.py).
Only in-process detokenizers know the tokens' own strings, which logprobs report.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import grpc
from tokenizers import Tokenizer

from genmesh.core.models.detokenizer import IncrementalDetokenizer
from genmesh.core.models.store import ModelNotFoundError, ModelStore
from genmesh.core.models.token_strings import TokenStrings
from genmesh.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.common.telemetry import trace_metadata
from services.frontend.errors import PipelineError, rpc_error

log = logging.getLogger("genmesh.frontend")


class DetokenizeMode(StrEnum):
    AUTO = "auto"  # in-process when the model store has the model's tokenizer, else remote
    LOCAL = "local"  # in-process; start-up fails without the model store
    REMOTE = "remote"  # the tokenizer service's Detokenize stream


class Detokenizing(Protocol):
    """One generation's detokenizer."""

    async def text(self, token_ids: Sequence[int], *, final: bool) -> str:
        """The text that became final with these ids; ``final`` releases the rest."""
        ...

    async def token_texts(self, token_ids: Sequence[int], *, final: bool
                          ) -> tuple[list[str], str]:
        """As ``text``, token by token: per id the text that became final with it (empty
        while its character is incomplete), and with ``final`` the rest the flush
        released. Joined, they are ``text``'s."""
        ...

    def close(self) -> None:
        ...


class Detokenizers(Protocol):
    def open(self, model: str, *, timeout_s: float) -> Detokenizing:
        """A detokenizer for one generation of ``model`` (skipping special tokens)."""
        ...

    def token_strings(self, model: str) -> TokenStrings | None:
        """The tokens' own strings of ``model``; None where they are not known here."""
        ...


class _Local:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)

    async def text(self, token_ids: Sequence[int], *, final: bool) -> str:
        text = self.detokenizer.push(token_ids)
        return text + self.detokenizer.flush() if final else text

    async def token_texts(self, token_ids: Sequence[int], *, final: bool
                          ) -> tuple[list[str], str]:
        # One step per id: as cheap as a step of several (the common case is one id).
        texts = [self.detokenizer.push((token_id,)) for token_id in token_ids]
        return texts, self.detokenizer.flush() if final else ""

    def close(self) -> None:
        pass


class LocalDetokenizers:
    """In-process detokenizers over tokenizers loaded once, by model name."""

    def __init__(self, tokenizers: Mapping[str, Tokenizer]) -> None:
        self.tokenizers = dict(tokenizers)
        self._strings: dict[str, TokenStrings] = {}  # by model, made on first use

    @classmethod
    def from_store(cls, store: ModelStore, models: Sequence[str]) -> LocalDetokenizers:
        """Loads each model's ``tokenizer.json`` from the store (as the tokenizer service
        does); raises ModelNotFoundError or FileNotFoundError when the store lacks it."""
        tokenizers = {}
        for model in models:
            path = store.path_of(model) / "tokenizer.json"
            if not path.exists():
                raise FileNotFoundError(f"model {model!r} has no tokenizer.json in {path.parent}")
            tokenizers[model] = Tokenizer.from_file(str(path))
        return cls(tokenizers)

    def open(self, model: str, *, timeout_s: float) -> Detokenizing:
        return _Local(self._tokenizer(model))

    def token_strings(self, model: str) -> TokenStrings:
        strings = self._strings.get(model)
        if strings is None:
            strings = self._strings[model] = TokenStrings(self._tokenizer(model))
        return strings

    def _tokenizer(self, model: str) -> Tokenizer:
        try:
            return self.tokenizers[model]
        except KeyError:
            raise PipelineError(grpc.StatusCode.NOT_FOUND,
                                f"model {model!r} is not served here") from None


class _Remote:
    """One Detokenize stream; every request message is answered by one message."""

    def __init__(self, stub: tokenizer_pb2_grpc.TokenizerStub, model: str, *,
                 timeout_s: float) -> None:
        self.call = stub.Detokenize(timeout=timeout_s, metadata=trace_metadata())
        # Open the stream now, so its setup overlaps the worker's prefill instead of
        # delaying the first token.
        self.opening = asyncio.ensure_future(self._round_trip(
            tokenizer_pb2.DetokenizeRequest(model=model, skip_special_tokens=True)))

    async def text(self, token_ids: Sequence[int], *, final: bool) -> str:
        await self.opening  # done long ago but for the first token; raises its error
        return await self._round_trip(tokenizer_pb2.DetokenizeRequest(
            token_ids=token_ids, flush=final))

    async def token_texts(self, token_ids: Sequence[int], *, final: bool
                          ) -> tuple[list[str], str]:
        # One round trip per message, not per token: its text ends with its last token.
        text = await self.text(token_ids, final=final)
        if not token_ids:
            return [], text
        return [""] * (len(token_ids) - 1) + [text], ""

    async def _round_trip(self, request: tokenizer_pb2.DetokenizeRequest) -> str:
        try:
            await self.call.write(request)
            reply = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, "tokenizer") from None
        if reply is grpc.aio.EOF:
            raise PipelineError(grpc.StatusCode.UNAVAILABLE,
                                "the tokenizer closed the detokenize stream; retry")
        return reply.text

    def close(self) -> None:
        if self.opening.done() and not self.opening.cancelled():
            self.opening.exception()  # retrieved: an error here was already reported or moot
        self.opening.cancel()
        self.call.cancel()


class RemoteDetokenizers:
    """The tokenizer service's Detokenize stream, one per generation."""

    def __init__(self, stub: tokenizer_pb2_grpc.TokenizerStub) -> None:
        self.stub = stub

    def open(self, model: str, *, timeout_s: float) -> Detokenizing:
        return _Remote(self.stub, model, timeout_s=timeout_s)

    def token_strings(self, model: str) -> None:
        return None  # the tokenizer is in another process


def choose(mode: DetokenizeMode, *, store_root: Path, models: Sequence[str],
           stub: tokenizer_pb2_grpc.TokenizerStub) -> LocalDetokenizers | RemoteDetokenizers:
    """The detokenizers this frontend uses for its life, per ``mode``."""
    if mode == DetokenizeMode.REMOTE:
        return RemoteDetokenizers(stub)
    try:
        local = LocalDetokenizers.from_store(ModelStore(store_root), models)
    except (ModelNotFoundError, FileNotFoundError) as exc:
        if mode == DetokenizeMode.LOCAL:
            raise
        log.warning("detokenizing through the tokenizer service (a round trip per worker "
                    "message): the model store has no tokenizer for the served model",
                    extra={"error": str(exc), "store": str(store_root)})
        return RemoteDetokenizers(stub)
    log.info("detokenizing in-process", extra={"models": list(models),
                                               "store": str(store_root)})
    return local
