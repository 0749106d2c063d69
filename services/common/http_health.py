"""The HTTP API's health port: ``GET /healthz`` in plaintext on 127.0.0.1, for the probes
in its container, which cannot pass the mutual TLS of its own port (the gRPC services'
equivalent is ``server.py:serve_health_port``).

A few lines of HTTP/1.1 over asyncio's streams rather than a second uvicorn server (two
in one process would both take over SIGTERM): one path, one answer, then the connection
closes. It runs on the service's event loop, so a loop that hangs fails the probe by its
timeout, where the HTTPS port's TLS handshake might still complete.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from http import HTTPStatus

LOOPBACK = "127.0.0.1"
HEALTH_PATH = "/healthz"
READ_TIMEOUT_S = 5.0  # a probe sends its request at once; a silent client is dropped
# The body's "status", as the HTTP API's own /healthz says it.
STATUS_WORDS = {HTTPStatus.OK: "serving", HTTPStatus.SERVICE_UNAVAILABLE: "draining"}


async def serve_http_health(is_ready: Callable[[], bool], *, port: int) -> asyncio.Server:
    """Listen on 127.0.0.1:``port``: ``GET /healthz`` answers 200 while ``is_ready()``,
    else 503 (as the HTTP API's own /healthz does); any other path 404, another method 405."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            status = _status(head.split(b"\r\n", 1)[0], is_ready)
            body = json.dumps({"status": STATUS_WORDS.get(status, status.phrase.lower())
                               }).encode()
            writer.write(f"HTTP/1.1 {status.value} {status.phrase}\r\n"
                         "Content-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass  # a client that left or sent no request: nothing to answer
        finally:
            writer.close()

    return await asyncio.start_server(answer, LOOPBACK, port)


def _status(request_line: bytes, is_ready: Callable[[], bool]) -> HTTPStatus:
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return HTTPStatus.BAD_REQUEST
    method, target, _ = parts
    if target.split(b"?", 1)[0] != HEALTH_PATH.encode():
        return HTTPStatus.NOT_FOUND
    if method != b"GET":
        return HTTPStatus.METHOD_NOT_ALLOWED
    return HTTPStatus.OK if is_ready() else HTTPStatus.SERVICE_UNAVAILABLE
