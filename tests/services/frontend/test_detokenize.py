"""The frontend's detokenizers: in-process on the model store's tokenizer.json, and the
tokenizer service's Detokenize stream (the real servicer over a loopback grpc.aio
server) give the same text for every worker message; the choice is made once."""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from tokenizers import Tokenizer

from genmesh.core.models.detokenizer import special_token_ids
from genmesh.core.models.store import ModelNotFoundError
from genmesh.v1 import tokenizer_pb2_grpc
from services.frontend.detokenize import (
    DetokenizeMode,
    Detokenizers,
    LocalDetokenizers,
    RemoteDetokenizers,
    choose,
)
from services.frontend.errors import PipelineError
from services.tokenizer.registry import TokenizerRegistry, load_tokenizer
from services.tokenizer.servicer import TokenizerServicer

MODEL = "smollm2-135m-instruct"
T = TypeVar("T")


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


async def with_tokenizer_service(model_dir: Path,
                                 use: Callable[[tokenizer_pb2_grpc.TokenizerStub],
                                               Awaitable[T]]) -> T:
    """Runs ``use`` against the real tokenizer servicer on a loopback port."""
    server = grpc.aio.server()
    tokenizer_pb2_grpc.add_TokenizerServicer_to_server(
        TokenizerServicer(TokenizerRegistry([load_tokenizer(MODEL, model_dir)])), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await use(tokenizer_pb2_grpc.TokenizerStub(channel))
    finally:
        await server.stop(None)


async def detokenize(detokenizers: Detokenizers, messages: list[list[int]]) -> list[str]:
    """Each worker message's text, the last message final."""
    detok = detokenizers.open(MODEL, timeout_s=10)
    try:
        return [await detok.text(ids, final=n == len(messages) - 1)
                for n, ids in enumerate(messages)]
    finally:
        detok.close()


def random_messages(rng: random.Random, pool: list[int], vocab_size: int) -> list[list[int]]:
    ids = [rng.choice(pool) if rng.random() < 0.7 else rng.randrange(vocab_size)
           for _ in range(rng.randint(1, 40))]
    messages, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        messages.append(ids[i:i + n])
        i += n
    return messages


def test_in_process_equals_the_tokenizer_service_message_for_message(model_dir, tokenizer):
    rng = random.Random(3)
    texts = ["héllo 😀 你好 ✓", "Grüße aus Köln — ½ € ™", "emoji 👩‍👩‍👧‍👦🇫🇷🤖", "日本語と한국어"]
    pool = [i for text in texts for i in tokenizer.encode(text).ids]
    pool += sorted(special_token_ids(tokenizer))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    cases = [random_messages(rng, pool, vocab_size) for _ in range(200)]
    local = LocalDetokenizers({MODEL: tokenizer})

    async def remote_texts(stub: tokenizer_pb2_grpc.TokenizerStub) -> list[list[str]]:
        remote = RemoteDetokenizers(stub)
        return [await detokenize(remote, messages) for messages in cases]

    remote = asyncio.run(with_tokenizer_service(model_dir, remote_texts))
    for messages, expected in zip(cases, remote, strict=True):
        got = asyncio.run(detokenize(local, messages))
        assert got == expected, messages
        flat = [i for ids in messages for i in ids]
        assert "".join(got) == tokenizer.decode(flat, skip_special_tokens=True)


def test_a_character_split_across_messages_waits_for_its_last_byte(tokenizer):
    ids = tokenizer.encode("héllo 😀 你好 ✓").ids
    texts = asyncio.run(detokenize(LocalDetokenizers({MODEL: tokenizer}),
                                   [[i] for i in ids]))
    # The emoji and each CJK character span two byte-level tokens; the last message is
    # final, so the flush adds nothing after " ✓".
    assert texts == ["h", "é", "llo", "", " 😀", " ", "", "你", "", "好", "", "", " ✓"]


def test_token_by_token_gives_the_same_text_and_each_token_its_share(tokenizer):
    rng = random.Random(5)
    pool = tokenizer.encode("héllo 😀 你好 ✓ Grüße — ½ €").ids
    pool += sorted(special_token_ids(tokenizer))
    local = LocalDetokenizers({MODEL: tokenizer})

    async def both(messages: list[list[int]]) -> tuple[list[str], list[str]]:
        whole, by_token = local.open(MODEL, timeout_s=1), local.open(MODEL, timeout_s=1)
        texts, joined = [], []
        for n, ids in enumerate(messages):
            final = n == len(messages) - 1
            texts.append(await whole.text(ids, final=final))
            token_texts, flushed = await by_token.token_texts(ids, final=final)
            assert len(token_texts) == len(ids)
            joined.append("".join(token_texts) + flushed)
        return texts, joined

    for _ in range(100):
        messages = random_messages(rng, pool, tokenizer.get_vocab_size())
        texts, joined = asyncio.run(both(messages))
        assert "".join(joined) == "".join(texts), messages
    # A character's bytes: the text comes with the token that completes it.
    ids = tokenizer.encode(" 😀").ids
    texts, flushed = asyncio.run(local.open(MODEL, timeout_s=1).token_texts(ids, final=True))
    assert (texts, flushed) == (["", " 😀"], "")


def test_the_tokens_strings_are_known_in_process_only(tokenizer):
    strings = LocalDetokenizers({MODEL: tokenizer}).token_strings(MODEL)
    hello = tokenizer.encode(" hello").ids[0]
    assert (strings(hello).text, strings(hello).raw) == (" hello", b" hello")
    assert RemoteDetokenizers(NoStub()).token_strings(MODEL) is None  # type: ignore[arg-type]
    with pytest.raises(PipelineError) as err:
        LocalDetokenizers({MODEL: tokenizer}).token_strings("gpt-9")
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer.encode("<|im_start|>assistant\nHi 你好<|im_end|>").ids
    texts = asyncio.run(detokenize(LocalDetokenizers({MODEL: tokenizer}), [ids[:3], ids[3:]]))
    assert "".join(texts) == "assistant\nHi 你好"


def test_an_unknown_model_is_not_found(tokenizer):
    with pytest.raises(PipelineError) as err:
        LocalDetokenizers({MODEL: tokenizer}).open("gpt-9", timeout_s=1)
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def fake_store(root: Path, model_dir: Path, *, with_tokenizer: bool) -> Path:
    folder = root / MODEL
    folder.mkdir(parents=True)
    shutil.copy(model_dir / "config.json", folder)
    if with_tokenizer:
        shutil.copy(model_dir / "tokenizer.json", folder)
    return root


class NoStub:
    """Detokenize is never called while choosing."""

    def Detokenize(self, *args: object, **kwargs: object) -> AsyncIterator[object]:
        raise AssertionError("called")


@pytest.mark.parametrize("mode", [DetokenizeMode.AUTO, DetokenizeMode.LOCAL])
def test_the_store_s_tokenizer_is_used_in_process(tmp_path, model_dir, mode):
    root = fake_store(tmp_path, model_dir, with_tokenizer=True)
    chosen = choose(mode, store_root=root, models=[MODEL], stub=NoStub())  # type: ignore[arg-type]
    assert isinstance(chosen, LocalDetokenizers)
    assert list(chosen.tokenizers) == [MODEL]


@pytest.mark.parametrize("lacks", ["the model", "its tokenizer.json"])
def test_auto_falls_back_to_the_service_without_the_store_and_local_refuses_to_start(
        tmp_path, model_dir, lacks):
    root = (tmp_path / "empty" if lacks == "the model"
            else fake_store(tmp_path, model_dir, with_tokenizer=False))
    stub = NoStub()
    chosen = choose(DetokenizeMode.AUTO, store_root=root, models=[MODEL],
                    stub=stub)  # type: ignore[arg-type]
    assert isinstance(chosen, RemoteDetokenizers) and chosen.stub is stub
    with pytest.raises((ModelNotFoundError, FileNotFoundError)):
        choose(DetokenizeMode.LOCAL, store_root=root, models=[MODEL],
               stub=stub)  # type: ignore[arg-type]


def test_remote_mode_never_reads_the_store(tmp_path):
    stub = NoStub()
    chosen = choose(DetokenizeMode.REMOTE, store_root=tmp_path / "absent", models=[MODEL],
                    stub=stub)  # type: ignore[arg-type]
    assert isinstance(chosen, RemoteDetokenizers)
