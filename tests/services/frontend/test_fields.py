"""The client's short strings are bounded before they reach a header, a status message or
another service: INVALID_ARGUMENT naming the field, never quoting a long value."""

from __future__ import annotations

import grpc
import pytest

from genmesh.v1 import common_pb2, generation_pb2
from services.frontend.catalog import ModelCatalog
from services.frontend.errors import PipelineError
from services.frontend.fields import check_name, check_roles
from services.frontend.requests import pipeline_request

CATALOG = ModelCatalog(model="m", versions=("v1",), tokenizer=None,  # type: ignore[arg-type]
                       worker=None, rpc_timeout_s=1.0)  # type: ignore[arg-type]


def refusal(request: generation_pb2.GenerateRequest) -> str:
    with pytest.raises(PipelineError) as refused:
        pipeline_request(request, catalog=CATALOG, tenant="t", request_id="r",
                         priority=common_pb2.PRIORITY_NORMAL,
                         method="Generate")
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return refused.value.message


def test_a_100_kb_model_name_is_refused_naming_its_size_not_quoting_it():
    message = refusal(generation_pb2.GenerateRequest(model="m" * 100_000, prompt="hi"))
    assert message == ("model: at most 128 printable ASCII characters without whitespace; "
                       f"got 100000 characters starting {'m' * 40!r}")


def test_a_version_and_a_request_id_are_bounded_like_a_name():
    assert refusal(generation_pb2.GenerateRequest(model_version="v 1", prompt="hi")) == (
        "model_version: at most 128 printable ASCII characters without whitespace; "
        "got 'v 1'")
    assert refusal(generation_pb2.GenerateRequest(request_id="x" * 65536, prompt="hi")) == (
        "request_id: at most 128 printable ASCII characters without whitespace (it is sent "
        f"as a header); got 65536 characters starting {'x' * 40!r}")


def test_a_1_mb_role_is_refused_before_any_service_sees_it():
    chat = generation_pb2.ChatTurnList(messages=[
        generation_pb2.Message(role="user", content="hi"),
        generation_pb2.Message(role="r" * 1_000_000, content="hi")])
    assert refusal(generation_pb2.GenerateRequest(chat=chat)) == (
        "chat.messages[1].role: 1 to 32 letters, digits, '_' or '-' (system, user, "
        f"assistant, ...); got 1000000 characters starting {'r' * 40!r}")


@pytest.mark.parametrize("value", ["m", "smollm2-135m-instruct", "a" * 128, "v1.2_rc:3"])
def test_names_that_can_travel_as_headers_pass(value):
    check_name("model", value)


@pytest.mark.parametrize("value", ["a" * 129, "a\nb", "é", "a b", "\x00"])
def test_names_that_cannot_are_refused(value):
    with pytest.raises(PipelineError):
        check_name("model", value)


def test_empty_means_unset_for_a_name_but_not_for_a_role():
    check_name("model", "")
    check_roles("messages", ["system", "user", "assistant", "tool", "a" * 32])
    for bad in ("", "a" * 33, "us er"):
        with pytest.raises(PipelineError):
            check_roles("messages", [bad])
