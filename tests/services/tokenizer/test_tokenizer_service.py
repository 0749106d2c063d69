"""The tokenizer as a real process, over gRPC."""

from __future__ import annotations

import json

import grpc
import pytest

from genmesh.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tests.procs import free_port, service

MULTILINGUAL = "héllo 😀 你好 ✓ — Grüße, 日本語, 👩‍👩‍👧‍👦!"
CHAT = [("system", "Be brief."), ("user", "Hi 你好!"), ("assistant", "Hello."),
        ("user", "Why is the sky blue?")]
STRICT_TEMPLATE = ("{% if messages[0]['role'] != 'user' %}"
                   "{{ raise_exception('Conversations must start with a user message') }}"
                   "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")


def model_folder(folder, model_dir, chat_template: str | None):
    """A model folder sharing the default model's tokenizer, with its own template."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({}))
    (folder / "tokenizer.json").symlink_to(model_dir / "tokenizer.json")
    if chat_template is not None:
        (folder / "chat_template.jinja").write_text(chat_template)
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, model_dir):
    """The address, the default model's name, a model without a chat template and one
    whose template rejects conversations that do not start with a user message."""
    tmp = tmp_path_factory.mktemp("tokenizer")
    bare = model_folder(tmp / "bare", model_dir, None)
    strict = model_folder(tmp / "strict", model_dir, STRICT_TEMPLATE)
    port = free_port()
    args = ["--port", str(port), "--models", f"{model_dir.name},{bare},{strict}"]
    with service("services.tokenizer.main", args, port=port, log_path=tmp / "tokenizer.log"):
        yield f"127.0.0.1:{port}", model_dir.name, bare, strict


@pytest.fixture(scope="module")
def stub(tokenizer):
    with grpc.insecure_channel(tokenizer[0]) as channel:
        yield tokenizer_pb2_grpc.TokenizerStub(channel)


def chat_request(model: str, messages=CHAT) -> tokenizer_pb2.ChatTemplateRequest:
    return tokenizer_pb2.ChatTemplateRequest(
        model=model, add_generation_prompt=True,
        messages=[tokenizer_pb2.ChatMessage(role=r, content=c) for r, c in messages])


def rpc_error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        reply = call(*args, timeout=10)
        if not isinstance(reply, tokenizer_pb2.TokenizeResponse | tokenizer_pb2.ModelDescription):
            list(reply)  # a stream fails while it is read
    return err.value


def test_tokenize(stub, tokenizer):
    model = tokenizer[1]
    reply = stub.Tokenize(tokenizer_pb2.TokenizeRequest(model=model, text="Hello world"),
                          timeout=10)
    assert (list(reply.token_ids), reply.text) == ([19556, 905], "Hello world")
    empty = stub.Tokenize(tokenizer_pb2.TokenizeRequest(model=model, text=""), timeout=10)
    assert list(empty.token_ids) == []


def test_apply_chat_template_matches_transformers(stub, tokenizer, model_dir):
    from transformers import AutoTokenizer

    reply = stub.ApplyChatTemplate(chat_request(tokenizer[1]), timeout=10)
    hf = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        [{"role": r, "content": c} for r, c in CHAT], add_generation_prompt=True,
        tokenize=True)
    assert list(reply.token_ids) == list(hf["input_ids"])
    assert reply.text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert reply.text.endswith("<|im_start|>assistant\n")
    assert list(reply.token_ids).count(1) == 5  # <|im_start|> once per turn, not doubled


def test_detokenize_streams_one_id_at_a_time_and_answers_every_message(stub, tokenizer):
    model = tokenizer[1]
    ids = list(stub.Tokenize(tokenizer_pb2.TokenizeRequest(model=model, text=MULTILINGUAL),
                             timeout=10).token_ids)
    requests = [tokenizer_pb2.DetokenizeRequest(model=model, skip_special_tokens=True)]
    requests += [tokenizer_pb2.DetokenizeRequest(token_ids=[i]) for i in [*ids, 2]]
    requests.append(tokenizer_pb2.DetokenizeRequest(flush=True))
    replies = [r.text for r in stub.Detokenize(iter(requests), timeout=10)]
    assert len(replies) == len(requests)
    assert "".join(replies) == MULTILINGUAL  # <|im_end|> (2) skipped
    assert "" in replies[1:-1]  # held back while a character was incomplete
    assert not any("\ufffd" in r for r in replies)


def test_detokenize_flush_releases_a_broken_end_and_special_tokens_can_be_kept(stub, tokenizer):
    half_a_character = [18645]  # the first of the two tokens of "你"
    requests = [tokenizer_pb2.DetokenizeRequest(model=tokenizer[1], token_ids=[2, 19556]),
                tokenizer_pb2.DetokenizeRequest(token_ids=half_a_character),
                tokenizer_pb2.DetokenizeRequest(flush=True)]
    replies = [r.text for r in stub.Detokenize(iter(requests), timeout=10)]
    assert replies == ["<|im_end|>Hello", "", "\ufffd"]


def test_describe_model(stub, tokenizer):
    _, model, bare, _ = tokenizer
    d = stub.DescribeModel(tokenizer_pb2.DescribeModelRequest(model=model), timeout=10)
    assert (d.model, d.vocab_size, d.has_chat_template, list(d.eos_token_ids),
            d.supports_tools) == (model, 49152, True, [2], False)  # its template names no tools
    assert not stub.DescribeModel(tokenizer_pb2.DescribeModelRequest(model=bare),
                                  timeout=10).has_chat_template


def test_unknown_model_is_not_found_listing_the_served_models(stub, tokenizer):
    for call, request in [
        (stub.Tokenize, tokenizer_pb2.TokenizeRequest(model="gpt-9", text="hi")),
        (stub.ApplyChatTemplate, chat_request("gpt-9")),
        (stub.DescribeModel, tokenizer_pb2.DescribeModelRequest(model="gpt-9")),
        (stub.Detokenize, iter([tokenizer_pb2.DetokenizeRequest(model="gpt-9")])),
    ]:
        err = rpc_error(call, request)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert "'gpt-9'" in err.details() and tokenizer[1] in err.details()


@pytest.mark.parametrize(("messages", "detail"), [
    ([], "messages is empty"),
    ([("user", "hi"), ("robot", "42")], "messages[1].role is 'robot'"),
])
def test_bad_conversation_is_invalid_argument(stub, tokenizer, messages, detail):
    err = rpc_error(stub.ApplyChatTemplate, chat_request(tokenizer[1], messages))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in err.details()


def test_chat_template_errors(stub, tokenizer):
    _, _, bare, strict = tokenizer
    err = rpc_error(stub.ApplyChatTemplate, chat_request(bare))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no chat template" in err.details()
    err = rpc_error(stub.ApplyChatTemplate, chat_request(strict))  # starts with "system"
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chat template rejected" in err.details()
    ok = stub.ApplyChatTemplate(chat_request(strict, [("user", "hi")]), timeout=10)
    assert ok.text == "hi"


@pytest.mark.parametrize(("requests", "detail"), [
    ([tokenizer_pb2.DetokenizeRequest(token_ids=[5])], "must name the model"),
    ([tokenizer_pb2.DetokenizeRequest(model="MODEL", token_ids=[5, 49152])], "49152"),
    ([tokenizer_pb2.DetokenizeRequest(model="MODEL"),
      tokenizer_pb2.DetokenizeRequest(token_ids=[-1])], "token id -1"),
])
def test_bad_detokenize_stream_is_invalid_argument(stub, tokenizer, requests, detail):
    for r in requests:
        if r.model == "MODEL":
            r.model = tokenizer[1]
    err = rpc_error(stub.Detokenize, iter(requests))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in err.details()


def test_the_server_survives_bad_input(stub, tokenizer):
    # Runs after the error tests above, on the same process.
    reply = stub.Tokenize(tokenizer_pb2.TokenizeRequest(model=tokenizer[1], text="Hello world"),
                          timeout=10)
    assert list(reply.token_ids) == [19556, 905]
