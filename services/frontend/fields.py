"""Bounds on the client's short strings, checked before any of them reaches metadata, a
header, a log line or another service.

A model name, a version, a request id or a chat role is an identifier: at most a few
dozen characters. Unchecked, a 100 KB model name came back in the status message of the
call, a trailer larger than the gateway's header limit, and the gateway reset the
connection it shares with every other call (issue 20). Each check raises PipelineError
INVALID_ARGUMENT naming the field and its size, never quoting an oversized value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import grpc

from services.frontend.errors import PipelineError

# Travel as headers (x-request-id, x-genmesh-model-version) and in status messages:
# printable ASCII without whitespace, which a gRPC metadata value takes as it is.
MAX_NAME_CHARS = 128
_NAME = re.compile(rf"[\x21-\x7e]{{1,{MAX_NAME_CHARS}}}")
# A chat role ("system", "user", "assistant", "tool"): the tokenizer decides which exist.
MAX_ROLE_CHARS = 32
_ROLE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_ROLE_CHARS}}}")
# How much of a refused value an error message may quote.
MAX_QUOTED_CHARS = 40


def check_name(field: str, value: str, *, what: str = "") -> None:
    """``value`` (empty: unset, allowed) as an identifier that may travel as a header."""
    if value and not _NAME.fullmatch(value):
        raise PipelineError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{field}: at most {MAX_NAME_CHARS} printable ASCII characters "
                            f"without whitespace{what}; got {_describe(value)}")


def check_roles(field: str, roles: Iterable[str]) -> None:
    """Every message's role: 1 to MAX_ROLE_CHARS letters, digits, '_' or '-'."""
    for i, role in enumerate(roles):
        if not _ROLE.fullmatch(role):
            raise PipelineError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{field}[{i}].role: 1 to {MAX_ROLE_CHARS} letters, digits, "
                                f"'_' or '-' (system, user, assistant, ...); got "
                                f"{_describe(role)}")


def _describe(value: str) -> str:
    """``value`` quoted when short, else its length and its start."""
    if len(value) <= MAX_QUOTED_CHARS:
        return repr(value)
    return f"{len(value)} characters starting {value[:MAX_QUOTED_CHARS]!r}"
